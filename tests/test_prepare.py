"""`python -m xpsr_jax.data.prepare` end to end on a tiny set, with the tiny random LLaVA."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.helpers.data_fixtures import textured_rgb, write_captions, write_hr_images
from tests.helpers.tiny_llava import tiny_llava_dir  # noqa: F401  (session fixture)
from xpsr_jax.captions.io import load_captions
from xpsr_jax.data import images, prepare, tfds_builder
from xpsr_jax.data.degradation import default_degradation_config, degrade, to_uint8, usm_sharpen

CROP = 32
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def usm_of(crop: np.ndarray, config) -> np.ndarray:
    """The official HR target: the crop sharpened by the degradation's USM, as uint8."""
    usm = config.usm
    return to_uint8(usm_sharpen(crop.astype(np.float32) / 255.0, radius=usm.radius,
                                weight=usm.weight, threshold=usm.threshold))


def write_hr_dir(folder) -> None:
    """3 usable images (6 crops at 2 per image), one too small, one corrupt, one truncated."""
    write_hr_images(folder, [(80, 96), (64, 64), (40, 130), (20, 20)])
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    whole = images.encode_png(textured_rgb(np.random.default_rng(9), 64, 64))
    (folder / "sub" / "truncated.png").write_bytes(whole[: len(whole) // 2])


def args(root, *extra, hr_root=None):
    return ["--hr-dir", str((hr_root or root) / "hr"), "--work-dir", str(root / "work"),
            "--data-dir", str(root / "tfds"), "--crop-size", str(CROP),
            "--crops-per-image", "2", *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llava_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("prepare")
    write_hr_dir(root / "hr")
    model = ["--highlevel-model", tiny_llava_dir, "--lowlevel-model", tiny_llava_dir,
             "--caption-max-new-tokens", "6", "--caption-batch-size", "6"]
    assert prepare.main(args(root, *model)) == 0
    return root, model


def test_end_to_end_dataset_matches_sources(prepared):
    root, _ = prepared
    work = root / "work"
    skipped = dict(line.split("\t") for line in (work / "skipped.txt").read_text().splitlines())
    assert set(skipped) == {"img_03.png", "sub/broken.jpg", "sub/truncated.png"}
    assert skipped["img_03.png"].startswith("too small: 20x20")
    assert skipped["sub/broken.jpg"].startswith("unreadable")
    assert skipped["sub/truncated.png"].startswith("unreadable")

    records = tfds_builder.read_degradation_records(work / "degradation.jsonl")
    assert sorted(records) == [f"img_{i:02d}_{k:03d}" for i in range(3) for k in range(2)]
    config = default_degradation_config()
    for image_id, record in records.items():
        top, left, size = record["crop"]
        source = images.read_rgb(root / "hr" / record["source_file"])
        crop = source[top:top + size, left:left + size]
        hr = images.read_rgb(work / "HR" / f"{image_id}.png")
        # Default hr_target "usm": the stored HR is the sharpened crop, the LR the crop degraded.
        np.testing.assert_array_equal(hr, usm_of(crop, config))
        assert np.abs(hr.astype(int) - crop).max() > 0
        lr, params = degrade(crop, config, seed=0, example_id=record["example_id"])
        np.testing.assert_array_equal(images.read_rgb(work / "LR" / f"{image_id}.png"), lr)
        assert params == record["params"]
    assert json.loads((work / "prepare_settings.json").read_text())["hr_target"] == "usm"
    assert tfds_builder.read_hr_target(root / "tfds") == "usm"
    info = tfds.builder_from_directory(
        str(tfds_builder.dataset_dir(root / "tfds", "prepared"))).info
    assert info.metadata["hr_target"] == "usm"

    captions = load_captions(work / "captions.jsonl")
    source = tfds.data_source("xpsr_pairs/prepared", split="train", data_dir=str(root / "tfds"))
    assert len(source) == 6
    for example in (source[i] for i in range(len(source))):
        image_id = example["image_id"].decode()
        for kind in ("hr", "lr"):
            expected = images.read_rgb(work / kind.upper() / f"{image_id}.png")
            np.testing.assert_array_equal(example[kind], expected)
        assert example["lr"].shape == (CROP // 4, CROP // 4, 3)
        assert example["lowlevel_prompt_hr"].decode() == captions[(image_id, "hr", "lowlevel")]
        assert example["highlevel_prompt_lr"].decode() == captions[(image_id, "lr", "highlevel")]
        assert example["degradation"]["jpeg1_quality"] == np.float32(
            records[image_id]["params"]["jpeg1_quality"])


def test_rerun_skips_finished_work_and_resumes_a_killed_crop(prepared, tmp_path, capsys):
    root, _ = prepared
    shutil.copytree(root / "work", tmp_path / "work")
    work = tmp_path / "work"
    lr_before = (work / "LR" / "img_01_001.png").read_bytes()
    jsonl_before = (work / "degradation.jsonl").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (work / "HR").iterdir()}
    # A kill between the HR and the LR write: no LR, no params, a stale temp file.
    (work / "LR" / "img_01_001.png").unlink()
    (work / "degradation" / "img_01_001.json").unlink()
    (work / "LR" / ".img_01_001.png.x1.tmp").write_bytes(b"half")

    capsys.readouterr()
    assert prepare.main(args(tmp_path, "--stages", "crop", hr_root=root)) == 0
    assert "1 crops written, 5 already there, 3 images skipped" in capsys.readouterr().out
    assert (work / "LR" / "img_01_001.png").read_bytes() == lr_before
    assert not (work / "LR" / ".img_01_001.png.x1.tmp").exists()
    assert (work / "degradation.jsonl").read_bytes() == jsonl_before
    for path in (work / "HR").iterdir():
        if path.name != "img_01_001.png":
            assert path.stat().st_mtime_ns == mtimes[path.name], path.name

    # Captions are complete, so no model is needed; the build goes to the new data dir.
    captions_before = (work / "captions.jsonl").read_bytes()
    assert prepare.main(args(tmp_path, "--stages", "caption,build", hr_root=root)) == 0
    assert (work / "captions.jsonl").read_bytes() == captions_before
    assert "already covers all 6 crops" in capsys.readouterr().out
    assert tfds_builder.is_built(tmp_path / "tfds", "prepared")


def test_changed_crop_settings_are_refused(prepared, capsys):
    root, _ = prepared
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(args(root, "--stages", "crop", "--seed", "1"))
    assert exit_info.value.code == 2
    assert "seed: 0 before, 1 now" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(args(root, "--stages", "crop", "--hr-target", "original"))
    assert "hr_target: 'usm' before, 'original' now" in capsys.readouterr().err


def test_hr_target_original_stores_the_crop(tmp_path):
    write_hr_images(tmp_path / "hr", [(64, 48)])
    assert prepare.main(args(tmp_path, "--stages", "crop", "--hr-target", "original")) == 0
    work = tmp_path / "work"
    records = tfds_builder.read_degradation_records(work / "degradation.jsonl")
    ids = sorted(records)
    config = default_degradation_config()
    for image_id, record in records.items():
        top, left, size = record["crop"]
        crop = images.read_rgb(tmp_path / "hr" / record["source_file"])[top:top + size,
                                                                        left:left + size]
        np.testing.assert_array_equal(images.read_rgb(work / "HR" / f"{image_id}.png"), crop)
        lr, _ = degrade(crop, config, seed=0, example_id=record["example_id"])
        np.testing.assert_array_equal(images.read_rgb(work / "LR" / f"{image_id}.png"), lr)
    write_captions(tmp_path / "captions.jsonl", ids)
    assert prepare.main(args(tmp_path, "--stages", "build", "--captions",
                             str(tmp_path / "captions.jsonl"))) == 0
    assert tfds_builder.read_hr_target(tmp_path / "tfds", "xpsr_pairs/prepared") == "original"


def test_bad_hr_target_is_refused_naming_the_key(tmp_path, capsys):
    config = prepare.default_prepare_config()
    config.update(hr_dir=str(tmp_path), work_dir=str(tmp_path / "work"), hr_target="sharp")
    expected = r"prepare\.hr_target .*'sharp'.*'usm'.*'original'"
    with pytest.raises(prepare.PrepareError, match=expected):
        prepare.run_crop_stage(config)
    assert not (tmp_path / "work").exists()  # refused before anything is written
    with pytest.raises(SystemExit):
        prepare.main(args(tmp_path, "--stages", "crop", "--hr-target", "sharp"))
    assert "--hr-target: invalid choice: 'sharp'" in capsys.readouterr().err


def test_precomputed_captions_config_file_and_grid_crops(tmp_path, capsys):
    write_hr_dir(tmp_path / "hr")
    config_arg = ["--config", f"{REPO_ROOT / 'configs' / 'data.py'}:runlocal"]
    # runlocal sets crop_size 128; the flag wins. grid: 64x64 -> 4 tiles, 80x96 -> 6, 40x130 -> 4.
    assert prepare.main(args(tmp_path, *config_arg, "--stages", "crop", "--crop-mode", "grid",
                                "--num-workers", "2")) == 0
    ids = sorted(p.stem for p in (tmp_path / "work" / "HR").glob("*.png"))
    assert len(ids) == 6 + 4 + 4
    settings = json.loads((tmp_path / "work" / "prepare_settings.json").read_text())
    assert settings["crop_size"] == CROP

    captions = tmp_path / "elsewhere.jsonl"
    write_captions(captions, ids, skip={(ids[3], "lr", "highlevel")})
    rest = args(tmp_path, *config_arg, "--stages", "caption,build", "--crop-mode", "grid",
                "--captions", str(captions))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        prepare.main(rest)
    assert "lacks captions: {'highlevel': 1}" in capsys.readouterr().err
    os.remove(captions)
    write_captions(captions, ids)
    assert prepare.main(rest) == 0
    source = tfds.data_source("xpsr_pairs/prepared", split="train", data_dir=str(tmp_path / "tfds"))
    assert sorted(source[i]["image_id"].decode() for i in range(len(source))) == ids


def test_crop_boxes():
    rng = np.random.default_rng(0)
    assert prepare.crop_boxes(70, 100, 32, "grid", 0, rng) == [
        (3, 2), (3, 34), (3, 66), (35, 2), (35, 34), (35, 66)]
    boxes = prepare.crop_boxes(70, 100, 32, "random", 50, rng)
    tops, lefts = zip(*boxes)
    assert len(set(boxes)) > 40 and 0 <= min(tops) and max(tops) <= 38 and max(lefts) <= 68
    assert prepare.image_base_id("a b/c.png") == "a_b__c"


def test_empty_prompts_build_a_dataset_without_a_caption_model(tmp_path, capsys):
    """--empty-prompts: no MLLM, every prompt "" (the released script's empty high-level prompt)."""
    write_hr_images(tmp_path / "hr", [(64, 48)])
    assert prepare.main(args(tmp_path, "--stages", "crop,caption,build", "--empty-prompts")) == 0
    assert "empty prompts written to" in capsys.readouterr().out
    ids = sorted(p.stem for p in (tmp_path / "work" / "HR").glob("*.png"))
    source = tfds.data_source("xpsr_pairs/prepared", split="train", data_dir=str(tmp_path / "tfds"))
    examples = [source[i] for i in range(len(source))]
    assert sorted(e["image_id"].decode() for e in examples) == ids
    prompt_keys = [k for k in examples[0] if "prompt" in k]
    assert len(prompt_keys) == 4 and all(e[k] == b"" for e in examples for k in prompt_keys)
    # Without it and without a model, the caption stage names both ways out.
    (tmp_path / "work" / "captions.jsonl").unlink()
    with pytest.raises(SystemExit):
        prepare.main(args(tmp_path, "--stages", "caption"))
    err = capsys.readouterr().err
    assert "--highlevel-model" in err and "--captions FILE" in err
