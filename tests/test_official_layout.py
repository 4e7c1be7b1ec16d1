"""One reader of the official folder layout: infer.py, training validation and the TFDS builder
take the same prompts from the same folder."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xpsr_jax.data.tfds_builder import DatasetSourceError, scan_official
from xpsr_jax.inference.prompts import PromptSource
from xpsr_jax.training.validation import load_validation_images


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def official_folder(root: Path, lowlevel_folders: dict[str, str]) -> Path:
    for folder in ("LR", "HR"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 80, np.uint8)).save(root / folder / "a.png")
    write(root / "highlevel_prompt" / "a.txt", "  a red barn in a field\nsecond line\n")
    write(root / "highlevel_prompt_GT" / "a.txt", "a sharp red barn\n")
    write(root / "lowlevel_prompt_q_GT" / "a.txt", "sharp, clean\n")
    for folder, text in lowlevel_folders.items():
        write(root / folder / "a.txt", text)
    return root


def three_readers(root: Path) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
    infer = PromptSource(official_root=root).prompts(root / "LR" / "a.png")
    image = load_validation_images(root / "LR", 1)[0]
    example = scan_official(root)[0].prompts
    return (infer, (image.highlevel_prompt, image.lowlevel_prompt),
            (example["highlevel_prompt_lr"], example["lowlevel_prompt_lr"]))


def test_validation_infer_and_the_dataset_read_the_same_prompts_from_both_spellings(tmp_path):
    root = official_folder(tmp_path / "set", {
        "lowlevel_prompt": "old spelling: blurry\n",
        "lowlevel_prompt_q": "  noisy, low resolution  \nmore\n"})
    infer, validation, dataset = three_readers(root)
    # lowlevel_prompt_q/ wins; first line, leading spaces removed (the release's readlines()[0].lstrip())
    assert infer == validation == dataset == ("a red barn in a field", "noisy, low resolution  ")


def test_the_only_other_lowlevel_spelling_is_read_by_all_three(tmp_path):
    root = official_folder(tmp_path / "set", {"lowlevel_prompt": "old spelling: blurry\n"})
    infer, validation, dataset = three_readers(root)
    assert infer == validation == dataset == ("a red barn in a field", "old spelling: blurry")


def test_ambiguous_lowlevel_folders_are_refused_by_every_reader(tmp_path):
    root = official_folder(tmp_path / "set", {"lowlevel_prompt_a": "x\n", "lowlevel_prompt_b": "y\n"})
    with pytest.raises(ValueError, match="several low-level prompt folders"):
        PromptSource(official_root=root)
    with pytest.raises(DatasetSourceError, match="several low-level prompt folders"):
        scan_official(root)
    # validation is best effort: the ambiguity is refused too, before training starts
    with pytest.raises(ValueError, match="several low-level prompt folders"):
        load_validation_images(root / "LR", 1)
