"""Evaluation: PSNR/SSIM on Y against scikit-image, reports, pairing and error messages.

scikit-image is the independent oracle (test extra): its `rgb2ycbcr` gives the BT.601 Y, and
`peak_signal_noise_ratio` / `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)` are the conventions basicsr follows. pyiqa is
never needed: its absence is tested as is, its presence with a fake module.
"""

from __future__ import annotations

import csv
import json
import socket
import sys
import types

import numpy as np
import pytest
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from xpsr_jax.data.images import write_png_atomic
from xpsr_jax.evaluation import cli, iqa
from xpsr_jax.evaluation.color import rgb_to_y
from xpsr_jax.evaluation.psnr_ssim import psnr_y, ssim_y


def _image_pair(height, width, seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # A smooth-ish ground truth and a noisy prediction, so SSIM is far from 0 and from 1.
    gt = np.clip(gt.astype(np.float64).cumsum(axis=1) / np.arange(1, width + 1)[None, :, None],
                 0, 255).astype(np.uint8)
    noise = rng.normal(0, 12, gt.shape)
    pred = np.clip(np.round(gt + noise), 0, 255).astype(np.uint8)
    return pred, gt


def _skimage_y(rgb, crop_border):
    y = rgb2ycbcr(rgb)[..., 0]
    return y[crop_border:-crop_border, crop_border:-crop_border] if crop_border else y


@pytest.mark.parametrize("height,width,crop_border", [(48, 64, 0), (37, 53, 4), (31, 29, 1)])
def test_psnr_ssim_match_scikit_image_on_y(height, width, crop_border):
    pred, gt = _image_pair(height, width, seed=height)
    pred_y, gt_y = _skimage_y(pred, crop_border), _skimage_y(gt, crop_border)
    expected_psnr = peak_signal_noise_ratio(gt_y, pred_y, data_range=255)
    expected_ssim = structural_similarity(
        gt_y, pred_y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=255)
    assert 0.2 < expected_ssim < 0.98  # a discriminating case, not a trivial one
    assert abs(psnr_y(pred, gt, crop_border) - expected_psnr) < 1e-4
    assert abs(ssim_y(pred, gt, crop_border) - expected_ssim) < 1e-4


def test_y_channel_is_bt601_as_scikit_image():
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(rgb), rgb2ycbcr(rgb)[..., 0], atol=1e-9)
    white_black = np.array([[[255, 255, 255], [0, 0, 0]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(white_black), [[235.0, 16.0]], atol=1e-3)


def test_psnr_identical_is_inf_and_too_small_for_ssim_is_an_error():
    pred, gt = _image_pair(20, 20, seed=1)
    assert psnr_y(gt, gt) == float("inf")
    assert ssim_y(gt, gt) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_y(pred, gt, crop_border=5)


@pytest.fixture
def folders(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    expected = {}
    for index, stem in enumerate(["img_a", "img_b", "img_c"]):
        pred, gt = _image_pair(26, 30 + index, seed=10 + index)
        write_png_atomic(pred_dir / f"{stem}.png", pred)
        write_png_atomic(gt_dir / f"{stem}.png", gt)
        expected[stem] = {"psnr": psnr_y(pred, gt, 2), "ssim": ssim_y(pred, gt, 2)}
    return pred_dir, gt_dir, expected


def _run(argv, capsys):
    code = cli.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_csv_markdown_json(folders, tmp_path, capsys):
    pred_dir, gt_dir, expected = folders
    out = tmp_path / "report"
    code, stdout, _ = _run(["--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics",
                            "psnr,ssim", "--crop-border", "2", "--out", str(out),
                            "--paper", "--dataset", "RealSR"], capsys)
    assert code == 0
    with open(out / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == list(expected)
    for row in rows:
        assert float(row["psnr"]) == pytest.approx(expected[row["image"]]["psnr"], abs=1e-9)
        assert float(row["ssim"]) == pytest.approx(expected[row["image"]]["ssim"], abs=1e-9)
    summary = json.loads((out / "means.json").read_text())
    mean_psnr = np.mean([scores["psnr"] for scores in expected.values()])
    mean_ssim = np.mean([scores["ssim"] for scores in expected.values()])
    assert summary["num_images"] == 3
    assert summary["means"]["psnr"] == pytest.approx(mean_psnr, abs=1e-9)
    assert summary["means"]["ssim"] == pytest.approx(mean_ssim, abs=1e-9)
    assert summary["settings"]["crop_border"] == 2
    assert summary["paper"]["dataset"] == "RealSR" and summary["paper"]["ssim"] == 0.6870
    markdown = (out / "means.md").read_text()
    assert f"| ssim | {mean_ssim:.4f} | 0.6870 |" in markdown
    assert f"| psnr | {mean_psnr:.2f} |" in markdown
    assert "| lpips | n/a | 0.3517 |" in markdown  # paper-only rows stay visible
    assert f"| ssim | {mean_ssim:.4f} | 0.6870 |" in stdout


def test_cli_unmatched_files_are_named(folders, capsys):
    pred_dir, gt_dir, _ = folders
    (pred_dir / "img_c.png").rename(pred_dir / "extra_pred.png")
    code, _, stderr = _run(["--pred", str(pred_dir), "--gt", str(gt_dir)], capsys)
    assert code == 2
    assert "unmatched images" in stderr
    assert f"in {pred_dir} without ground truth: extra_pred.png" in stderr
    assert f"in {gt_dir} without prediction: img_c.png" in stderr


def test_cli_unreadable_image_is_named(folders, capsys):
    pred_dir, gt_dir, _ = folders
    (gt_dir / "img_b.png").write_bytes(b"not a png at all")
    code, _, stderr = _run(["--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics", "psnr"],
                           capsys)
    assert code == 2
    assert f"cannot decode image {gt_dir / 'img_b.png'}" in stderr


def test_cli_bad_metric_names(folders, capsys):
    pred_dir, gt_dir, _ = folders
    code, _, stderr = _run(["--pred", str(pred_dir), "--metrics", "psnr,maniqa"], capsys)
    assert code == 2 and "name the variant, maniqa_koniq" in stderr
    code, _, stderr = _run(["--pred", str(pred_dir), "--metrics", "psnrr"], capsys)
    assert code == 2 and "unknown metric 'psnrr'; valid: psnr, ssim, lpips" in stderr


def test_cli_pyiqa_absent_names_the_reason_and_psnr_still_runs(folders, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setattr(iqa, "pyiqa_installed", lambda: False)
    pred_dir, gt_dir, expected = folders
    out = tmp_path / "report"
    code, stdout, stderr = _run(["--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics",
                                 "psnr,lpips", "--out", str(out)], capsys)
    assert code == 0
    assert "lpips: pyiqa is not installed" in stderr
    summary = json.loads((out / "means.json").read_text())
    assert list(summary["means"]) == ["psnr"]
    assert summary["unavailable"]["lpips"].startswith("pyiqa is not installed")
    assert "- lpips: pyiqa is not installed" in (out / "means.md").read_text()
    # No-reference mode: psnr needs --gt, and with nothing left to run the command fails.
    code, _, stderr = _run(["--pred", str(pred_dir), "--metrics", "psnr,musiq"], capsys)
    assert code == 2
    assert "none of the requested metrics can run" in stderr
    assert "psnr: full-reference metric: needs --gt" in stderr
    assert "musiq: pyiqa is not installed" in stderr
    # One line per reason: the default metric list misses eight pyiqa metrics for the same reason.
    code, _, stderr = _run(["--pred", str(pred_dir), "--gt", str(gt_dir)], capsys)
    assert code == 0 and stderr.count("pyiqa is not installed") == 1, stderr
    assert "lpips, dists, fid, niqe, musiq, maniqa_koniq, maniqa_pipal, clipiqa: pyiqa is not installed" in stderr


class _FakePyiqaMetric:
    """Stands in for a pyiqa InferenceModel: mean brightness (NR) or mean abs diff (FR)."""

    def __init__(self, name):
        self.name = name
        if name == "musiq":  # a metric whose weights are not where our table says
            socket.create_connection(("example.invalid", 443))

    def __call__(self, pred, gt=None):
        if isinstance(pred, str):  # FID over folders
            return 12.5
        return (pred - gt).abs().mean() if gt is not None else pred.mean()


def test_cli_fake_pyiqa_runs_local_metrics_and_refuses_downloads(folders, tmp_path,
                                                                 monkeypatch, capsys):
    fake = types.ModuleType("pyiqa")
    fake.create_metric = lambda name, device=None: _FakePyiqaMetric(name)
    monkeypatch.setitem(sys.modules, "pyiqa", fake)
    caches = {kind: tmp_path / "cache" / kind for kind in
              ("pyiqa", "torchvision", "clip", "huggingface")}
    monkeypatch.setattr(iqa, "_cache_dir", lambda kind: caches[kind])
    for name in ("lpips", "fid", "musiq", "clipiqa"):  # dists / maniqa weights stay missing
        for path in iqa.expected_weight_paths(iqa.IQA_METRICS[name]):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    pred_dir, gt_dir, _ = folders
    out = tmp_path / "report"
    code, _, stderr = _run(["--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics",
                            "psnr,lpips,dists,fid,musiq,maniqa_pipal,clipiqa", "--out", str(out),
                            "--device", "cpu"], capsys)
    assert code == 0
    summary = json.loads((out / "means.json").read_text())
    assert set(summary["means"]) == {"psnr", "lpips", "fid", "clipiqa"}
    assert summary["means"]["fid"] == 12.5
    assert 0.0 < summary["means"]["lpips"] < 0.2 and 0.2 < summary["means"]["clipiqa"] < 0.8
    reasons = summary["unavailable"]
    assert reasons["dists"].startswith("weights not found locally (nothing is downloaded)")
    assert str(caches["pyiqa"] / "DISTS_weights-f5e65c96.pth") in reasons["dists"]
    assert str(caches["torchvision"] / "vgg16-397923af.pth") in reasons["dists"]
    assert "MANIQA_PIPAL-ae6d356b.pth" in reasons["maniqa_pipal"]
    assert reasons["musiq"].startswith("pyiqa tried to download (refused)")
    assert "maniqa_pipal: weights not found locally" in stderr
    with open(out / "per_image.csv") as handle:
        assert next(csv.reader(handle)) == ["image", "psnr", "lpips", "clipiqa"]
    assert socket.create_connection.__name__ == "create_connection"  # the guard is lifted


def test_python_dash_m_entry_point(folders, tmp_path):
    import subprocess

    pred_dir, gt_dir, _ = folders
    done = subprocess.run([sys.executable, "-m", "xpsr_jax.evaluate", "--pred", str(pred_dir),
                           "--gt", str(gt_dir), "--metrics", "ssim", "--no-progress"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "3 images, full-reference" in done.stdout and "| ssim |" in done.stdout


def test_size_mismatch_skips_the_pair_and_gt_can_be_cropped_to_the_prediction(tmp_path, capsys):
    """A 451x300 HR against a 448x300 SR: reported and skipped while the rest are scored (exit 1),
    or with --crop-gt-to-pred scored against the HR's top-left 448x300."""
    pred_dir, gt_dir = tmp_path / "sr", tmp_path / "hr"
    good_pred, good_gt = _image_pair(32, 40, seed=1)
    write_png_atomic(pred_dir / "good.png", good_pred)
    write_png_atomic(gt_dir / "good.png", good_gt)
    big_gt = np.random.default_rng(2).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    odd_pred = np.clip(big_gt[:, :448].astype(int) + 3, 0, 255).astype(np.uint8)
    write_png_atomic(pred_dir / "odd.png", odd_pred)
    write_png_atomic(gt_dir / "odd.png", big_gt)
    out = tmp_path / "report"
    code, _, err = _run(["--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics", "psnr", "--out", str(out)],
                        capsys)
    assert code == 1 and "1 image(s) not scored" in err
    assert "odd.png is 448x300 but" in err and "is 451x300 (width x height) (--crop-gt-to-pred crops" in err
    summary = json.loads((out / "means.json").read_text())
    assert summary["num_images"] == 1 and list(summary["skipped"]) == ["odd"]
    assert summary["means"]["psnr"] == pytest.approx(psnr_y(good_pred, good_gt))
    code, _, err = _run(["--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics", "psnr", "--out", str(out),
                         "--crop-gt-to-pred"], capsys)
    assert code == 0, err
    summary = json.loads((out / "means.json").read_text())
    expected = (psnr_y(good_pred, good_gt) + psnr_y(odd_pred, big_gt[:, :448])) / 2
    assert summary["num_images"] == 2 and summary["means"]["psnr"] == pytest.approx(expected)
    # A prediction larger than its ground truth is never cropped: still skipped, and alone it fails.
    (pred_dir / "good.png").unlink()
    (gt_dir / "good.png").unlink()
    write_png_atomic(pred_dir / "odd.png", np.zeros((300, 452, 3), np.uint8))
    code, _, err = _run(["--pred", str(pred_dir), "--gt", str(gt_dir), "--metrics", "psnr", "--crop-gt-to-pred"],
                        capsys)
    assert code == 2 and "no image could be scored" in err and "452x300" in err
