"""SD 1.5 as one original-layout checkpoint: a tiny SD 1.5 in the diffusers layout, written again
in the single-file layout by the tests' own writer (tests/helpers/ldm_layout.py), loads to
identical tensors through `xpsr_jax.models.single_file`; diffusers' own `from_single_file`
reads the same file to the same weights; the EMA, fp16 and `.ckpt` variants load; what is
missing is named; infer.py and the training config take the file."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ldm_layout
from xpsr_jax.models.single_file import sd15_folder
from xpsr_jax.models.tiny import write_tiny_model
from xpsr_jax.weights.files import WeightFileError, read_state_dict, write_state_dict

REPO = Path(__file__).resolve().parents[1]
PARTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def diffusers_parts(tiny):
    return {part: read_state_dict(tiny.sd15 / part / f"{stem}.safetensors") for part, stem in PARTS.items()}


@pytest.fixture(scope="module")
def configs_only(tiny, tmp_path_factory):
    """The tiny SD folder without its weights: configs, tokenizer and scheduler only, so every
    tensor a test sees comes from the single file."""
    folder = tmp_path_factory.mktemp("configs") / "sd15"
    shutil.copytree(tiny.sd15, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


def single_file_checkpoint(tiny, parts, *, dtype=None) -> dict[str, np.ndarray]:
    configs = {part: json.loads((tiny.sd15 / part / "config.json").read_text()) for part in ("unet", "vae")}
    checkpoint = {**ldm_layout.unet_to_ldm(parts["unet"], configs["unet"]),
                  **ldm_layout.vae_to_ldm(parts["vae"], configs["vae"]),
                  **ldm_layout.clip_to_ldm(parts["text_encoder"])}
    return {key: value.astype(dtype) if dtype else value for key, value in checkpoint.items()}


def converted_parts(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {part: read_state_dict(folder / part / f"{stem}.safetensors") for part, stem in PARTS.items()}


def assert_same_parts(got, expected, dtype=None):
    for part in PARTS:
        assert sorted(got[part]) == sorted(expected[part]), part
        for key, value in expected[part].items():
            want = value.astype(dtype) if dtype else value
            assert got[part][key].dtype == want.dtype and np.array_equal(got[part][key], want), f"{part}: {key}"


def test_single_file_loads_to_identical_tensors_and_is_converted_once(tiny, diffusers_parts, configs_only,
                                                                       tmp_path):
    from xpsr_jax.models import AutoencoderKL, CLIPTextEncoder
    from xpsr_jax.weights.convert import module_state_dict

    path = tmp_path / "v1-5-tiny-emaonly.safetensors"
    write_state_dict(path, single_file_checkpoint(tiny, diffusers_parts))
    logged = []
    folder = sd15_folder(path, config_folder=configs_only, cache_root=tmp_path / "cache", log=logged.append)
    assert_same_parts(converted_parts(folder), diffusers_parts)
    assert len(logged) == 2 and "non-EMA" in logged[1]
    # The networks load strictly from the converted folder, to the weights of the original one.
    for cls, part in ((AutoencoderKL, "vae"), (CLIPTextEncoder, "text_encoder")):
        ours, original = (module_state_dict(cls.from_pretrained(root, subfolder=part)) for root in (folder, tiny.sd15))
        assert sorted(ours) == sorted(original) and all(np.array_equal(ours[k], original[k]) for k in ours)
    assert (folder / "tokenizer" / "vocab.json").read_bytes() == (tiny.sd15 / "tokenizer" / "vocab.json").read_bytes()
    # A second call finds the cached folder and converts nothing.
    assert sd15_folder(path, config_folder=configs_only, cache_root=tmp_path / "cache", log=logged.append) == folder
    assert len(logged) == 2


def test_diffusers_from_single_file_reads_the_same_file_to_the_same_weights(tiny, diffusers_parts, tmp_path):
    """diffusers' loader, given the local configs (offline), agrees with the file the tests wrote:
    the writer produces the real layout, not one only our reader understands."""
    import diffusers

    path = tmp_path / "tiny.safetensors"
    write_state_dict(path, single_file_checkpoint(tiny, diffusers_parts))
    for cls, part in ((diffusers.UNet2DConditionModel, "unet"), (diffusers.AutoencoderKL, "vae")):
        model = cls.from_single_file(str(path), config=str(tiny.sd15), subfolder=part, local_files_only=True)
        state = {key: value.numpy() for key, value in model.state_dict().items()}
        expected = diffusers_parts[part]
        assert sorted(state) == sorted(expected), part
        for key, value in expected.items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{part}: {key}")


def test_ema_fp16_and_ckpt_variants_load(tiny, diffusers_parts, configs_only, tmp_path):
    full = single_file_checkpoint(tiny, diffusers_parts)
    unet_keys = [key for key in full if key.startswith(ldm_layout.UNET_PREFIX)]
    # The full v1-5-pruned file: the trained (non-EMA) UNet under model.*, its EMA under model_ema.*.
    ema_file = dict(full, **ldm_layout.ema_copy({key: full[key] for key in unet_keys}))
    ema_file.update({key: full[key] + np.float32(1.0) for key in unet_keys})
    write_state_dict(tmp_path / "full.safetensors", ema_file)
    logged = []
    folder = sd15_folder(tmp_path / "full.safetensors", config_folder=configs_only, cache_root=tmp_path / "c1",
                         log=logged.append)
    assert_same_parts(converted_parts(folder), diffusers_parts)  # the EMA weights, not the +1 ones
    assert "(EMA UNet weights)" in logged[-1]

    write_state_dict(tmp_path / "fp16.safetensors", single_file_checkpoint(tiny, diffusers_parts, dtype=np.float16))
    folder = sd15_folder(tmp_path / "fp16.safetensors", config_folder=configs_only, cache_root=tmp_path / "c2",
                         log=logged.append)
    assert_same_parts(converted_parts(folder), diffusers_parts, dtype=np.float16)
    from xpsr_jax.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")  # fp16 file -> float32 parameters
    assert vae.encoder.conv_in.kernel[...].dtype == np.float32

    torch.save({"state_dict": {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in full.items()}},
               tmp_path / "model.ckpt")
    folder = sd15_folder(tmp_path / "model.ckpt", config_folder=configs_only, cache_root=tmp_path / "c3",
                         log=logged.append)
    assert_same_parts(converted_parts(folder), diffusers_parts)


def test_what_a_single_file_lacks_is_named(tiny, diffusers_parts, configs_only, tmp_path):
    path = tmp_path / "sd.safetensors"
    write_state_dict(path, single_file_checkpoint(tiny, diffusers_parts))
    with pytest.raises(WeightFileError, match=r"holds no tokenizer; give --tokenizer DIR"):
        sd15_folder(path, cache_root=tmp_path / "cache")
    with pytest.raises(WeightFileError, match=r"--tokenizer .*: no CLIP tokenizer there"):
        sd15_folder(path, tokenizer=tmp_path, cache_root=tmp_path / "cache")
    not_sd = tmp_path / "other.safetensors"
    write_state_dict(not_sd, {"encoder.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(WeightFileError, match=r"not a Stable Diffusion 1.x single-file checkpoint: no \['unet', "
                                              r"'vae', 'text_encoder'\] weights"):
        sd15_folder(not_sd, config_folder=configs_only, cache_root=tmp_path / "cache")
    no_configs = tmp_path / "no_configs"
    shutil.copytree(configs_only / "tokenizer", no_configs / "tokenizer")
    with pytest.raises(WeightFileError, match=r"no unet/config.json"):
        sd15_folder(path, config_folder=no_configs, cache_root=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/model_index.json"))  # nothing half-converted left behind


def test_infer_and_the_training_config_take_the_single_file(tiny, diffusers_parts, configs_only, tmp_path,
                                                            monkeypatch):
    from xpsr_jax.configs.train import get_config
    from xpsr_jax.inference.cli import main
    from xpsr_jax.training.config import check_base_model, resolve_train_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "sd.safetensors"
    write_state_dict(path, single_file_checkpoint(tiny, diffusers_parts))
    lr = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(lr)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["--weights", str(tiny.xpsr), "--sd15", str(path), "--tokenizer", str(configs_only),
                     "--sd15-config", str(configs_only), "--input", str(lr), "--output", str(tmp_path / "out"),
                     "--highlevel-prompt", "a photo", "--lowlevel-prompt", "sharp",
                     "--config", str(REPO / "configs" / "infer.py:tiny"), "--config.num_inference_steps=1"])
    assert code == 0, printed.getvalue()
    assert "converting" in printed.getvalue() and Image.open(tmp_path / "out" / "lr.png").size == (64, 64)

    config = get_config()
    config.base_model, config.base_model_config = str(path), str(configs_only)
    config.pipeline.tokenizer_path = str(configs_only / "tokenizer")
    resolved = resolve_train_config(config)
    assert Path(resolved.base_model).parent == tmp_path / "cache" / "xpsr_jax" / "sd15_single_file"
    check_base_model(resolved.base_model)


def test_a_replaced_file_is_converted_again_even_with_its_size_and_mtime_restored(tiny, diffusers_parts,
                                                                                    configs_only, tmp_path):
    """The cache is keyed by the file's content: another file of the same size, put in place with
    the old modification time, gets its own conversion (its weights, not the old ones); the same
    file again is neither converted nor read whole again."""
    import os

    path = tmp_path / "model.safetensors"
    write_state_dict(path, single_file_checkpoint(tiny, diffusers_parts))
    logged = []
    first = sd15_folder(path, config_folder=configs_only, cache_root=tmp_path / "cache", log=logged.append)
    stat = path.stat()
    changed = {part: dict(state) for part, state in diffusers_parts.items()}
    changed["vae"]["decoder.conv_out.bias"] = changed["vae"]["decoder.conv_out.bias"] + np.float32(1.0)
    write_state_dict(path, single_file_checkpoint(tiny, changed))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = sd15_folder(path, config_folder=configs_only, cache_root=tmp_path / "cache", log=logged.append)
    assert second != first and len(logged) == 4
    assert_same_parts(converted_parts(second), changed)
    assert_same_parts(converted_parts(first), diffusers_parts)

    import hashlib

    reads = []
    real_file_digest = hashlib.file_digest
    hashlib.file_digest = lambda *args: reads.append(args) or real_file_digest(*args)
    try:
        assert sd15_folder(path, config_folder=configs_only, cache_root=tmp_path / "cache", log=logged.append) == second
    finally:
        hashlib.file_digest = real_file_digest
    assert len(logged) == 4 and reads == []  # the digest of this version of the file is remembered


def test_a_wrong_shape_tensor_is_named_against_the_single_file(tiny, diffusers_parts, configs_only, tmp_path):
    checkpoint = single_file_checkpoint(tiny, diffusers_parts)
    key = "first_stage_model.decoder.conv_out.weight"
    checkpoint[key] = np.zeros((3, 1, 3, 3), np.float32)  # the model expects (3, C, 3, 3)
    path = tmp_path / "bad.safetensors"
    write_state_dict(path, checkpoint)
    with pytest.raises(WeightFileError, match=rf"^{path} \(vae weights\): state dict does not match AutoencoderKL: "
                                              r"1 mis-shaped tensor\(s\): decoder.conv_out.weight: file has "
                                              r"\(3, 1, 3, 3\), model expects"):
        sd15_folder(path, config_folder=configs_only, cache_root=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/model_index.json"))


def test_a_cache_folder_that_cannot_be_made_is_one_line(tiny, diffusers_parts, configs_only, tmp_path):
    path = tmp_path / "sd.safetensors"
    write_state_dict(path, single_file_checkpoint(tiny, diffusers_parts))
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    with pytest.raises(WeightFileError, match=rf"{path}: cannot make the folder {blocker / 'cache'} for its "
                                              r"converted copy \(a file is in the way\); set XDG_CACHE_HOME"):
        sd15_folder(path, config_folder=configs_only, cache_root=blocker / "cache")
    assert blocker.read_text() == "mine"
