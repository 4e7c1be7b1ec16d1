"""The MLLM ablation command end to end on the tiny models (tiny XPSR + tiny random LLaVA): two
settings, the Table 3 layout written as Markdown and JSON with the paper's numbers beside ours,
metrics that cannot run named, and a rerun that skips the finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.tiny_llava import record_caption_inputs, tiny_llava_dir  # noqa: F401  (session fixture)
from xpsr_jax.experiments import mllm_ablation
from xpsr_jax.models.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def test_settings_parse_to_what_the_mllm_sees_and_is_asked():
    settings = mllm_ablation.parse_settings("original,llava13b=/m/13b,simple,downscale64,blur=3,jpeg", "/m/7b")
    assert settings["original"] == {"captioner": "/m/7b", "caption_transform": "", "question_preset": "official"}
    assert settings["llava13b"]["captioner"] == "/m/13b"
    assert settings["simple"]["question_preset"] == "simple"
    assert settings["downscale64"]["caption_transform"] == "downscale:64"
    assert settings["blur"]["caption_transform"] == "gaussian_blur:3"
    assert settings["jpeg"]["caption_transform"] == "jpeg:30"
    for bad, message in (("sharpen", "unknown setting"), ("llava13b", "needs the model folder"),
                         ("simple=2", "takes no value"), ("jpeg,jpeg", "twice")):
        with pytest.raises(ValueError, match=message):
            mllm_ablation.parse_settings(bad, "/m/7b")


def test_two_settings_end_to_end_then_a_rerun_skips_them(tiny, tmp_path, monkeypatch, capsys,
                                                         tiny_llava_dir):  # noqa: F811
    lr, gt = tmp_path / "LR", tmp_path / "HR"
    lr.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        hr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(hr).save(gt / f"{name}.png")
        Image.fromarray(hr).resize((16, 16), Image.BICUBIC).save(lr / f"{name}.png")
    seen = record_caption_inputs(monkeypatch)
    out = tmp_path / "ablation"
    argv = ["--lr", str(lr), "--gt", str(gt), "--dataset", "DRealSR", "--weights", str(tiny.xpsr),
            "--sd15", str(tiny.sd15), "--captioner", tiny_llava_dir, "--settings", "original,jpeg=10",
            "--metrics", "ssim,lpips", "--config", str(REPO / "configs" / "infer.py:tiny"),
            "--set", "num_inference_steps=1", "--set", "captioner.max_new_tokens=4", "--out", str(out)]
    assert mllm_ablation.main(argv) == 0
    printed = capsys.readouterr().out
    assert len(seen) == 8  # 2 settings x 2 images x 2 prompt kinds
    jpeg_captions = [json.loads(line) for line in (out / "jpeg" / "sr" / "captions.jsonl").read_text().splitlines()]
    assert {r["caption_transform"] for r in jpeg_captions} == {"jpeg:10"}
    for setting in ("original", "jpeg"):
        assert sorted(p.name for p in (out / setting / "sr").glob("*.png")) == ["a.png", "b.png"]
    summary = json.loads((out / "table.json").read_text())
    assert [row["setting"] for row in summary["rows"]] == ["original", "jpeg"]
    for row in summary["rows"]:
        assert row["images"] == 2 and 0 < row["means"]["ssim"] <= 1
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| setting | SSIM | LPIPS | paper (DRealSR): SSIM / LPIPS / FID")
    assert "| original (captions of the LR) | " in table and "0.722 / 0.3864 / 164.68 / 0.5713 / 67.84" in table
    assert "+ captions of a JPEG-compressed LR" in table and "0.7137 / 0.3902 / 170.83" in table
    if "lpips" in summary["rows"][0]["unavailable"]:  # no LPIPS weights offline: named, with the reason
        assert "Not computed: lpips: " in table and "n/a" in table
    assert "wrote" in printed

    calls = []
    monkeypatch.setattr(mllm_ablation.infer_cli, "main", lambda argv: calls.append(argv) or 0)
    assert mllm_ablation.main(argv) == 0
    assert calls == [] and capsys.readouterr().out.count("done before: skipped") == 2
    assert (out / "table.md").read_text() == table
