"""The MLLM ablation command end to end on the tiny models (tiny XPSR + tiny random LLaVA): two
settings, the Table 3 layout written as Markdown and JSON with the paper's numbers beside ours,
metrics that cannot run named, and a rerun that skips the finished stages; a rerun from other
inputs redoes the metrics (with a note) or refuses the SR stage; every bad input is refused
before any work."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
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


def write_pairs(root: Path, names=("a", "b")) -> tuple[Path, Path]:
    """LR (16 px) and HR (64 px) noise images with the same stems."""
    lr, gt = root / "LR", root / "HR"
    lr.mkdir(parents=True)
    gt.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        hr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(hr).save(gt / f"{name}.png")
        Image.fromarray(hr).resize((16, 16), Image.BICUBIC).save(lr / f"{name}.png")
    return lr, gt


def study_argv(tiny, llava, lr, gt, out, *extra) -> list[str]:
    argv = ["--lr", str(lr), "--dataset", "DRealSR", "--weights", str(tiny.xpsr), "--sd15", str(tiny.sd15),
            "--captioner", llava, "--settings", "original,jpeg=10", "--metrics", "ssim,lpips",
            "--config", str(REPO / "configs" / "infer.py:tiny"), "--set", "num_inference_steps=1",
            "--set", "captioner.max_new_tokens=4", "--out", str(out), *extra]
    return argv + (["--gt", str(gt)] if gt is not None else [])


@pytest.fixture(scope="module")
def finished(tiny, tiny_llava_dir, tmp_path_factory):  # noqa: F811
    """The study run once: two settings on two images."""
    root = tmp_path_factory.mktemp("study")
    lr, gt = write_pairs(root)
    out = root / "ablation"
    argv = study_argv(tiny, tiny_llava_dir, lr, gt, out)
    printed, errors = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_caption_inputs(monkeypatch)
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
            code = mllm_ablation.main(argv)
    assert code == 0, printed.getvalue()[-3000:] + errors.getvalue()[-3000:]
    return {"root": root, "lr": lr, "gt": gt, "out": out, "argv": argv, "seen": seen, "printed": printed.getvalue()}


def no_sr(monkeypatch) -> list:
    """infer.py's calls from now on (none may come)."""
    calls = []
    monkeypatch.setattr(mllm_ablation.infer_cli, "main", lambda argv: calls.append(argv) or 0)
    return calls


def test_two_settings_end_to_end_then_a_rerun_skips_them(finished, monkeypatch, capsys):
    out, argv = finished["out"], finished["argv"]
    assert len(finished["seen"]) == 8  # 2 settings x 2 images x 2 prompt kinds
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
    assert "wrote" in finished["printed"]
    # What each stage was made from is recorded beside it.
    record = json.loads((out / "jpeg" / "sr_inputs.json").read_text())
    assert record["lr"] == str(finished["lr"].resolve()) and record["caption_transform"] == "jpeg:10"
    assert record["config_values"]["num_inference_steps"] == 1 and len(record["weights_fingerprint"]) == 64
    inputs = json.loads((out / "jpeg" / "metrics.json").read_text())["inputs"]
    assert inputs["gt"] == str(finished["gt"].resolve()) and inputs["metrics"] == ["ssim", "lpips"]

    calls = no_sr(monkeypatch)
    assert mllm_ablation.main(argv) == 0
    assert calls == [] and capsys.readouterr().out.count("done before: skipped") == 2
    assert (out / "table.md").read_text() == table


def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "ablation"
    shutil.copytree(finished["out"], out)
    return out


def listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_another_gt_or_metrics_list_redoes_the_metrics_with_a_note(finished, tiny, tiny_llava_dir, tmp_path,
                                                                   monkeypatch, capsys):  # noqa: F811
    out = copy_of(finished, tmp_path)
    gt2 = tmp_path / "HR2"
    shutil.copytree(finished["gt"], gt2)
    Image.fromarray(255 - np.asarray(Image.open(gt2 / "a.png"))).save(gt2 / "a.png")
    calls = no_sr(monkeypatch)
    assert mllm_ablation.main(study_argv(tiny, tiny_llava_dir, finished["lr"], gt2, out)) == 0
    printed = capsys.readouterr().out
    assert calls == [] and "done before: skipped" not in printed
    assert printed.count("metrics redone: gt: ") == 2 and "gt_images: " in printed
    before = json.loads((finished["out"] / "original" / "metrics.json").read_text())
    after = json.loads((out / "original" / "metrics.json").read_text())
    assert after["inputs"]["gt"] == str(gt2.resolve()) and after["means"]["ssim"] != before["means"]["ssim"]
    assert (out / "table.md").read_text() != (finished["out"] / "table.md").read_text()

    argv = study_argv(tiny, tiny_llava_dir, finished["lr"], gt2, out)
    argv[argv.index("ssim,lpips")] = "ssim"
    assert mllm_ablation.main(argv) == 0
    assert capsys.readouterr().out.count('metrics redone: metrics: ["ssim", "lpips"] -> ["ssim"]') == 2
    # A metrics.json of an older version (no record of its inputs) is redone too: it is derived.
    record = json.loads((out / "jpeg" / "metrics.json").read_text())
    (out / "jpeg" / "metrics.json").write_text(json.dumps({k: v for k, v in record.items() if k != "inputs"}))
    assert mllm_ablation.main(argv) == 0
    assert "[jpeg] metrics redone: made by an older version" in capsys.readouterr().out


def test_an_sr_stage_made_from_other_inputs_is_refused_before_any_work(finished, tiny, tiny_llava_dir, tmp_path,
                                                                       monkeypatch, capsys):  # noqa: F811
    out = copy_of(finished, tmp_path)
    calls = no_sr(monkeypatch)
    before = listing(out)

    def refused(argv) -> str:
        assert mllm_ablation.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and calls == [] and listing(out) == before, captured
        return captured.err

    base = study_argv(tiny, tiny_llava_dir, finished["lr"], finished["gt"], out)
    steps = [a if a != "num_inference_steps=1" else "num_inference_steps=2" for a in base]
    assert refused(steps) == (f"error: {out / 'original'}: made from other inputs (config num_inference_steps: 1 -> 2);"
                              f" give another --out, or remove {out / 'original'} to redo this setting\n")
    lr2 = tmp_path / "LR2"
    shutil.copytree(finished["lr"], lr2)
    Image.open(lr2 / "b.png").transpose(Image.FLIP_LEFT_RIGHT).save(lr2 / "b.png")
    message = refused(study_argv(tiny, tiny_llava_dir, lr2, finished["gt"], out))
    assert f"lr: \"{finished['lr'].resolve()}\" -> \"{lr2.resolve()}\"" in message and "lr_images: " in message
    # How SR runs may change (a smaller batch after running out of memory): still the same stage.
    assert mllm_ablation.main(base + ["--set", "batch_size=1", "--set", "captioner.batch_size=1"]) == 0
    assert capsys.readouterr().out.count("done before: skipped") == 2
    # An SR stage of an older version recorded nothing: refused, not silently reused nor redone.
    (out / "jpeg" / "sr_inputs.json").unlink()
    before = listing(out)
    assert "made by an older version" in refused(base)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def bad_input_cases(tiny, llava, lr, gt, tmp_path):
    """(argv changes, message) of inputs the study must refuse before any work."""
    extra_gt, small_gt, short_gt = tmp_path / "extra_gt", tmp_path / "small_gt", tmp_path / "short_gt"
    for folder in (extra_gt, small_gt, short_gt):
        shutil.copytree(gt, folder)
    Image.new("RGB", (64, 64)).save(extra_gt / "c.png")
    Image.new("RGB", (60, 64)).save(small_gt / "b.png")
    (short_gt / "b.png").unlink()
    lr_notes = tmp_path / "lr_notes"
    shutil.copytree(lr, lr_notes)
    (lr_notes / "notes.txt").write_text("not an image")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        ({"--gt": None, "--metrics": "psnr"}, "--metrics psnr: full-reference, they need --gt"),
        ({"--gt": None}, "--metrics ssim,lpips: full-reference, they need --gt"),
        ({"--gt": str(a_file)}, f"--gt {a_file}: is a file, not a folder of HR images"),
        ({"--gt": str(tmp_path / "missing")}, f"--gt {tmp_path / 'missing'}: no such folder"),
        ({"--gt": str(short_gt)}, f"--gt {short_gt}: no image for the LR image(s) b.png"),
        ({"--gt": str(extra_gt)}, f"--gt {extra_gt}: image(s) c.png have no LR image in --lr"),
        ({"--gt": str(small_gt)}, f"--gt {small_gt / 'b.png'}: 60x64 px, but the x4 SR of {lr / 'b.png'} is 64x64"),
        ({"--lr": str(lr_notes)}, f"--lr {lr_notes}: holds files that are not images (notes.txt)"),
        ({"--lr": str(tmp_path / "missing")}, f"{tmp_path / 'missing'}: no such folder"),
        ({"--metrics": ""}, "--metrics '' names no metric"),
        ({"--metrics": "maniqa"}, "metric 'maniqa' is ambiguous"),
        ({"--metrics": "psnr,sharpness"}, "unknown metric 'sharpness'"),
        ({"--weights": str(tmp_path / "missing")}, f"--weights {tmp_path / 'missing'}: weights folder not found"),
        ({"--sd15": str(tmp_path / "missing")}, f"--sd15 {tmp_path / 'missing'}: no such folder"),
        ({"--sd15": str(a_file)}, f"--sd15 {a_file}: no such folder, nor a single-file checkpoint"),
        ({"--captioner": str(tiny.sd15 / "vae")}, "not an image-text-to-text model"),
        ({"--lowlevel-captioner": str(tmp_path / "missing")}, "does not exist"),
        ({"--settings": "original,llava13b=" + str(a_file)}, f"model folder {str(a_file)!r} is a file, not a folder"),
        ({"--config": str(tmp_path / "missing.py")}, "no such config file"),
        ({"--set": "num_inference_steps"}, "--set 'num_inference_steps': expected KEY=VALUE"),
        ({"--set": "steps=2"}, "unknown config key 'steps'"),
        ({"--set": "num_inference_steps=0"}, "num_inference_steps=0 is invalid"),
        ({"--set": "guidance_scale=nan"}, "guidance_scale=nan is invalid"),
        ({"--set": "captioner.question_preset=simple"}, "captioner.question_preset is what the settings change"),
        ({"--out": str(a_file)}, f"--out {a_file}: exists and is not a folder"),
        ({"--out": str(a_file / "out")}, f"--out {a_file / 'out'}: cannot be a folder: {a_file} is a file"),
    ]


def with_changes(argv: list[str], changes: dict) -> list[str]:
    argv = list(argv)
    for flag, value in changes.items():
        if flag == "--set":
            argv += ["--set", value]
        elif flag not in argv:
            argv += [flag, value]
        elif value is None:
            del argv[argv.index(flag):argv.index(flag) + 2]
        else:
            argv[argv.index(flag) + 1] = value
    return argv


def test_every_input_is_checked_before_any_work(pairs, tiny, tiny_llava_dir, tmp_path, monkeypatch,
                                                capsys):  # noqa: F811
    lr, gt = pairs
    calls = no_sr(monkeypatch)
    out = tmp_path / "never"
    base = study_argv(tiny, tiny_llava_dir, lr, gt, out)
    for changes, message in bad_input_cases(tiny, tiny_llava_dir, lr, gt, tmp_path):
        code = mllm_ablation.main(with_changes(base, changes))
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (changes, err)
        assert calls == [] and not out.exists(), changes


def test_an_output_folder_that_cannot_be_written_is_refused_first(pairs, tiny, tiny_llava_dir, tmp_path,
                                                                  monkeypatch, capsys):  # noqa: F811
    lr, gt = pairs
    calls = no_sr(monkeypatch)
    parent = tmp_path / "locked"
    parent.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(parent)]).returncode != 0:
        pytest.skip("chattr +i (an immutable folder) needs root on ext4")
    try:
        code = mllm_ablation.main(study_argv(tiny, tiny_llava_dir, lr, gt, parent / "out"))
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    err = capsys.readouterr().err
    assert code == 2 and f"--out {parent / 'out'}: cannot write in {parent} (Operation not permitted)" in err, err
    assert calls == [] and not any(parent.iterdir())


def test_the_command_refuses_a_missing_gt_in_one_line(pairs, tiny, tiny_llava_dir, tmp_path):  # noqa: F811
    lr, _ = pairs
    environment = {k: v for k, v in os.environ.items() if k != "XPSR_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "xpsr_jax.experiments.mllm_ablation",
                           *study_argv(tiny, tiny_llava_dir, lr, None, tmp_path / "out", "--metrics", "psnr,musiq")],
                          cwd=REPO, env={**environment, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.splitlines() == ["error: --metrics psnr: full-reference, they need --gt (the HR folder, images "
                                        "named as the LR); or ask only no-reference metrics, e.g. --metrics "
                                        "maniqa_koniq,musiq"]
    assert not (tmp_path / "out").exists()
