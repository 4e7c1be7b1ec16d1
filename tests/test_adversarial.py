"""Bad input and faults through the real command lines (`python -m xpsr_jax...`, as a user types
them): each case asserts the exit status, the one-line message, and what is (not) on disk after.
No case may print a Python traceback (docs/robustness.md lists what is covered). Most cases stop
before any model loads, so the whole module runs in about a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xpsr_jax.models.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
def command(*argv, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`python -m ARGV` in a fresh process (no XPSR_DEBUG, CPU only). No command may print a
    traceback, whatever its input: checked on every call's whole output."""
    environment = {k: v for k, v in os.environ.items() if k != "XPSR_DEBUG"}
    environment.update(JAX_PLATFORMS="cpu", **(env or {}))
    done = subprocess.run([sys.executable, "-m", *map(str, argv)], cwd=cwd or REPO, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert (done.stdout + done.stderr).count("Traceback") == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def one_line_error(done: subprocess.CompletedProcess, code: int = 2) -> str:
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    assert errors, done.stderr
    return "\n".join(errors)


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture()
def lr_folder(tmp_path):
    folder = tmp_path / "lr"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def infer(tiny, lr, out, *extra, env=None):
    return command("xpsr_jax.infer", "--weights", tiny.xpsr, "--sd15", tiny.sd15, "--input", lr, "--output", out,
                   "--config", "configs/infer.py:tiny", "--highlevel-prompt", "a", "--lowlevel-prompt", "b", *extra,
                   env=env)


def test_export_overwrite_refuses_its_own_input(tiny, tmp_path):
    before = listing(tiny.xpsr)
    done = command("xpsr_jax.export", "orbax", "--weights", tiny.xpsr, "--out", tiny.xpsr, "--overwrite")
    assert f"--out {tiny.xpsr} is the export's input {tiny.xpsr}" in one_line_error(done)
    done = command("xpsr_jax.export", "orbax", "--weights", tiny.xpsr, "--out", tiny.xpsr.parent, "--overwrite")
    assert f"--out {tiny.xpsr.parent} contains the export's input" in one_line_error(done)
    assert listing(tiny.xpsr) == before


def test_inputs_sharing_a_stem_are_refused(tiny, lr_folder, tmp_path):
    Image.open(lr_folder / "a.png").save(lr_folder / "a.jpg")
    done = infer(tiny, lr_folder, tmp_path / "sr")
    assert "a.jpg and a.png -> a.png" in one_line_error(done)
    assert not (tmp_path / "sr").exists()


@pytest.mark.parametrize("override, key", [("--config.guidance_scale=inf", "guidance_scale=inf"),
                                           ("--config.guidance_scale=nan", "guidance_scale=nan"),
                                           ("--config.conditioning_scale=nan", "conditioning_scale=nan")])
def test_non_finite_recipe_values_are_refused(tiny, lr_folder, tmp_path, override, key):
    done = infer(tiny, lr_folder, tmp_path / "sr", override)
    assert f"{key} is invalid; valid: a finite number" in one_line_error(done)
    assert not (tmp_path / "sr").exists()


def test_output_folders_that_cannot_be_written(tiny, lr_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    done = infer(tiny, lr_folder, blocker / "sr")
    assert f"--output {blocker / 'sr'}: cannot be a folder: a file is in the way ({blocker})" in one_line_error(done)
    assert blocker.read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        done = infer(tiny, lr_folder, locked)
        assert "cannot write there" in one_line_error(done)


def test_truncated_and_pickled_weights_name_the_file(tiny, lr_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny.xpsr, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = infer(tiny, lr_folder, tmp_path / "sr", "--weights", broken)
    assert f"{weights}: not a readable safetensors file" in one_line_error(done)

    class Payload:  # what a hostile .bin carries: code run by unpickling
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    weights.unlink()
    torch.save({"conv_in.weight": torch.ones(1), "x": Payload()}, weights.with_suffix(".bin"))
    done = infer(tiny, lr_folder, tmp_path / "sr", "--weights", broken)
    message = one_line_error(done)
    assert "refused for safety" in message and ".safetensors, the safe format" in message
    assert "weights_only=False" not in done.stderr and not (tmp_path / "pwned").exists()


def test_config_files_and_variants(tiny, lr_folder, tmp_path):
    done = infer(tiny, lr_folder, tmp_path / "sr", "--config", tmp_path / "nope.py")
    assert "no such config file" in one_line_error(done)
    done = infer(tiny, lr_folder, tmp_path / "sr", "--config", "configs/infer.py:tiyn")
    assert "unknown variant(s) ['tiyn']" in one_line_error(done)
    done = command("xpsr_jax.train", "--config", "configs/train.py:tiyn", "--workdir", tmp_path / "run")
    assert "unknown variant(s) ['tiyn']" in one_line_error(done)
    assert not (tmp_path / "run").exists()


def test_evaluate_report_folder_under_a_file(lr_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    done = command("xpsr_jax.evaluate", "--pred", lr_folder, "--metrics", "musiq", "--out", blocker / "report")
    assert f"--out {blocker / 'report'}: cannot create the report folder" in one_line_error(done)


def test_a_captions_folder_and_a_broken_link(tiny, lr_folder, tmp_path):
    done = infer(tiny, lr_folder, tmp_path / "sr", "--captions", tmp_path)
    assert "is a folder; give the captions JSONL file in it" in one_line_error(done)
    (lr_folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (lr_folder / "a.png").unlink()
    done = infer(tiny, lr_folder, tmp_path / "sr")
    assert "broken link to" in one_line_error(done, code=1)
    assert "1 rejected" in done.stdout


def test_xpsr_debug_shows_the_traceback(tiny, lr_folder, tmp_path):
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XPSR_DEBUG="1")
    done = subprocess.run([sys.executable, "-m", "xpsr_jax.infer", "--weights", tiny.xpsr, "--input", lr_folder,
                           "--output", tmp_path / "sr", "--config.guidance_scale=inf", "--highlevel-prompt", "a",
                           "--lowlevel-prompt", "b"], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2 and "Traceback" in done.stderr and "guidance_scale=inf" in done.stderr



@pytest.mark.parametrize("override, message", [
    ("--config.guidance_scale=1e39", "guidance_scale=1e+39 is invalid; valid: a finite number >= 0 and at most "
                                     "3.403e+38 (float32"),
    ("--config.conditioning_scale=-1e39", "conditioning_scale=-1e+39 is invalid; valid: a finite number of "
                                          "magnitude at most 3.403e+38 (dtype=float32)"),
    ("--config.guidance_scale=1" + "0" * 400, "guidance_scale=inf is invalid"),
    ("--config.seed=18446744073709551616", "seed=18446744073709551616 is invalid"),
    ("--config.seed=4294967296", "seed=4294967296 is invalid; valid: an integer in [0, 4294967295]"),
    ("--config.seed=-1", "seed=-1 is invalid; valid: an integer in [0, 4294967295]"),
])
def test_settings_that_overflow_or_wrap_are_refused_by_name(tiny, lr_folder, tmp_path, override, message):
    """A float that is finite in Python but inf in the dtype it is computed in (black images), and a
    seed that JAX would silently wrap to another (2**32 draws the image of seed 0)."""
    done = infer(tiny, lr_folder, tmp_path / "sr", override)
    assert message in one_line_error(done)
    assert not (tmp_path / "sr").exists()


def test_non_finite_weights_fail_each_image_instead_of_writing_a_black_one(tiny, lr_folder, tmp_path):
    """An SD 1.5 folder whose VAE holds NaN: each image is a per-file error naming the tensors, no
    PNG is written, exit 1. The same run has XDG_CACHE_HOME pointing at a file, so the default
    compile cache cannot be made: a warning line, and the run goes on without it."""
    import shutil

    from xpsr_jax.weights.files import read_state_dict, write_state_dict

    sd15 = tmp_path / "sd15-nan"
    shutil.copytree(tiny.sd15, sd15)
    weights = sd15 / "vae" / "diffusion_pytorch_model.safetensors"
    state = read_state_dict(weights)
    state["decoder.conv_out.weight"] = np.full_like(state["decoder.conv_out.weight"], np.nan)
    write_state_dict(weights, state)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(lr_folder / "b.png")
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("a file where the cache folder would go")
    done = infer(tiny, lr_folder, tmp_path / "sr", "--sd15", sd15, env={"XDG_CACHE_HOME": str(not_a_folder)})
    message = one_line_error(done, code=1)
    for name in ("a.png", "b.png"):
        assert f"{lr_folder / name}: the sampled image holds NaN or inf values, so none was written; the weights " \
               "hold NaN or inf (vae: decoder.conv_out.kernel)" in message
    assert "wrote 0 image(s)" in done.stdout and "2 failed" in done.stdout
    assert not any((tmp_path / "sr").glob("*.png"))
    assert f"warning: the compile cache {not_a_folder / 'xpsr_jax' / 'jax_cache'} cannot be used" in done.stderr
    assert not_a_folder.read_text() == "a file where the cache folder would go"


def test_a_compile_cache_the_user_names_must_be_usable(tiny, lr_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for folder, reason in [(blocker, "a file is in the way"), (blocker / "cache", "Not a directory")]:
        done = infer(tiny, lr_folder, tmp_path / "sr", f"--config.compile_cache={folder}")
        assert f"compile_cache={folder}: cannot be used as the compile cache ({reason})" in one_line_error(done)
    assert blocker.read_text() == "mine" and not (tmp_path / "sr").exists()


def test_a_huge_input_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    """A 9000 x 9000 px PNG (1 MB) would make a 36000 x 36000 px image: refused from the header;
    the decoder (patched to fail) is never reached."""
    from xpsr_jax.configs.infer import get_config
    from xpsr_jax.inference import cli
    from xpsr_jax.inference.preprocess import InputImageError

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((9000, 9000, 3), np.uint8)).save(path, compress_level=1)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file refused by its header")

    monkeypatch.setattr(cli, "read_rgb", no_decoding)
    with pytest.raises(InputImageError, match=r"9000x9000 px input makes a 36000x36000 px image \(1,296,000,000 "
                                              r"px\), over max_output_pixels=16,777,216"):
        cli.load_lr(path, config=get_config())


def test_bad_weights_are_named_before_any_captioning(tiny, lr_folder, tmp_path):
    """With --captioner, the captions are made before the networks load: a wrong --weights or
    --sd15 must be named first, not after an hour of captioning."""
    for flags, message in [(["--weights", tmp_path / "missing"], f"{tmp_path / 'missing'}: weights folder not found"),
                           (["--sd15", tmp_path], f"{tmp_path}: missing SD 1.5 subfolder(s)")]:
        done = command("xpsr_jax.infer", "--weights", tiny.xpsr, "--sd15", tiny.sd15, "--input", lr_folder,
                       "--output", tmp_path / "sr", "--config", "configs/infer.py:tiny", "--captioner",
                       tmp_path / "no-model-here", *flags)
        assert message in one_line_error(done)
        assert not (tmp_path / "sr" / "captions.jsonl").exists()
