"""`python -m xpsr_jax.quickstart`: its input checks, which compile nothing. The chain itself
(shortened: 3 steps, 2 images of 64 px) runs in tests/end_to_end/test_quickstart.py.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from xpsr_jax import quickstart

REPO = Path(__file__).resolve().parents[1]
IMAGES = ("astronaut", "coffee")  # two of the committed examples, shrunk to 64 px


def write_examples(folder: Path) -> Path:
    (folder / "hr").mkdir(parents=True)
    for stem in IMAGES:
        image = Image.open(REPO / "examples" / "hr" / f"{stem}.png").convert("RGB")
        image.resize((64, 64), Image.Resampling.LANCZOS).save(folder / "hr" / f"{stem}.png")
    (folder / "captions.jsonl").write_bytes((REPO / "examples" / "captions.jsonl").read_bytes())
    return folder


def test_a_workdir_with_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert quickstart.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--workdir {tmp_path} exists and holds files the quickstart did not write" in err
    assert "notes.txt" in err
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_examples_without_captions_are_refused(tmp_path, capsys):
    examples = write_examples(tmp_path / "examples")
    (examples / "captions.jsonl").unlink()
    assert quickstart.main(["--workdir", str(tmp_path / "run"), "--examples", str(examples)]) == 2
    assert f"{examples / 'captions.jsonl'} is missing" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
