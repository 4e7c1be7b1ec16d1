"""`python -m xpsr_jax.quickstart`: the whole chain, shortened (3 steps, 2 images of 64 px, the
tiny model with one layer per UNet block), through the same code as the README command.

The chain runs once per module, in a subprocess (a fresh JAX, as the command gets); the other
test reads what it left behind.

    python -m pytest tests/end_to_end/test_quickstart.py -q -s
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_quickstart import IMAGES, write_examples
from xpsr_jax import quickstart

pytestmark = pytest.mark.end_to_end

REPO = Path(__file__).resolve().parents[2]
STEPS = 3

# The README command, with the tiny model's UNet cut to one layer per block (train_cli_fixtures
# does the same): compiling the train step is most of this test's time.
DRIVER = """
import sys
from unittest import mock
from xpsr_jax import quickstart
from xpsr_jax.models import tiny

with mock.patch.dict(tiny.UNET_CONFIG, {"layers_per_block": 1}):
    sys.exit(quickstart.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    examples = write_examples(root / "examples")
    workdir = root / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", DRIVER, "--workdir", str(workdir), "--steps",
                           str(STEPS), "--examples", str(examples)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"quickstart failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return workdir, examples, done.stdout


def test_each_stage_leaves_sane_outputs(chain):
    from safetensors.numpy import load_file

    from xpsr_jax.weights.formats import RELEASE, detect_weights_format
    from xpsr_jax.training.metrics import read_metrics_jsonl

    workdir, _, stdout = chain
    ids = [f"{stem}_000" for stem in IMAGES]
    # data: one degraded LR (16 px) per 64 px example, the HR kept as it was.
    for image_id in ids:
        assert Image.open(workdir / "prepare" / "LR" / f"{image_id}.png").size == (16, 16)
        assert Image.open(workdir / "prepare" / "HR" / f"{image_id}.png").size == (64, 64)
    assert (workdir / "tfds" / "xpsr_pairs" / "prepared").is_dir()
    # train: every step logged with a finite loss, and the last step checkpointed.
    records = read_metrics_jsonl(workdir / "train" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert (workdir / "train" / "checkpoints" / str(STEPS)).is_dir()
    # export: an official-layout release holding the trained weights (the infer stage loaded
    # it strictly: XPSRPipeline.from_pretrained(release), so no second load here).
    release = workdir / "release"
    assert detect_weights_format(release) == RELEASE
    trained = load_file(release / "controlnet" / "diffusion_pytorch_model.safetensors")
    initial = load_file(workdir / "model" / "xpsr" / "controlnet" /
                        "diffusion_pytorch_model.safetensors")
    assert trained.keys() == initial.keys()
    assert any(not np.array_equal(trained[k], initial[k]) for k in trained), \
        "the exported ControlNet equals the untrained one"
    # infer: one SR image of 4x the LR per LR image.
    for image_id in ids:
        lr = Image.open(workdir / "prepare" / "LR" / f"{image_id}.png")
        sr = Image.open(workdir / "sr" / f"{image_id}.png")
        assert sr.size == (4 * lr.size[0], 4 * lr.size[1]) and sr.mode == "RGB"
    # evaluate: a row per image, finite PSNR / SSIM, and the summary quotes the means.
    with open(workdir / "eval" / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["image"] for row in rows) == ids
    for row in rows:
        assert 0 < float(row["psnr"]) < 100 and -1 <= float(row["ssim"]) <= 1
    means = json.loads((workdir / "eval" / "means.json").read_text())["means"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary["stages"]) == list(quickstart.STAGES)
    assert summary["stages"]["train"]["result"]["steps"] == STEPS
    assert summary["stages"]["evaluate"]["result"]["psnr"] == means["psnr"]
    assert f"PSNR {means['psnr']:.2f} dB" in stdout
    for folder in ("release", "sr", "eval", "train"):
        assert str(workdir / folder) in stdout


def test_a_rerun_keeps_the_finished_stages(chain, capsys):
    workdir, examples, _ = chain
    before = {p: p.stat().st_mtime_ns for p in (workdir / "sr").iterdir()}
    assert quickstart.main(["--workdir", str(workdir), "--steps", str(STEPS),
                            "--examples", str(examples)]) == 0
    out = capsys.readouterr().out
    assert out.count("kept from the last run") == len(quickstart.STAGES)
    assert {p: p.stat().st_mtime_ns for p in (workdir / "sr").iterdir()} == before
    assert quickstart.main(["--workdir", str(workdir), "--steps", str(STEPS - 1),
                            "--examples", str(examples)]) == 2
    assert f"trained to {STEPS} steps; pass --steps >= {STEPS}" in capsys.readouterr().err
