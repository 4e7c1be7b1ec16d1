"""End-to-end one-step training (`configs/train.py:tiny,one_step`) on the tiny model, 2 CPU devices.

One uninterrupted run; a second one killed with SIGKILL after its first checkpoint and resumed
by the same command must end on the same parameters, step for step. The generator's data loss
(pixel MSE to HR) on held-out crops is lower after training than at its initialisation.
"""
from __future__ import annotations

import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from tests.helpers.data_fixtures import textured_rgb
from tests.helpers.train_cli_fixtures import run_and_signal, run_train
from tests.test_train_cli import setup  # noqa: F401  (a fixture)
from xpsr_jax.models.lpips import VGG16_CHANNELS, VGG16_CONV_INDICES
from xpsr_jax.training.metrics import read_metrics_jsonl
from xpsr_jax.weights.files import write_state_dict

pytestmark = pytest.mark.end_to_end

TOTAL_STEPS = 8
VARIANTS = "tiny,one_step"
LOSS_KEYS = ("loss", "l2", "lpips", "vsd", "regulariser", "grad_norm")


def _write_random_vgg16(path: Path) -> Path:
    """A torchvision-layout VGG16 trunk with random weights (safetensors)."""
    rng = np.random.default_rng(0)
    state, channels = {}, 3
    for index, width in zip(VGG16_CONV_INDICES, VGG16_CHANNELS):
        state[f"features.{index}.weight"] = (rng.standard_normal((width, channels, 3, 3))
                                             / np.sqrt(channels * 9)).astype(np.float32)
        state[f"features.{index}.bias"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
        channels = width
    write_state_dict(path, state)
    return path


@pytest.fixture(scope="module")
def flags(setup, tmp_path_factory):  # noqa: F811
    backbone = _write_random_vgg16(tmp_path_factory.mktemp("lpips") / "vgg16.safetensors")
    return (f"--config.loss.lpips_backbone={backbone}",
            f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every=3", "--config.keep_checkpoints=3",
            "--config.log_every=1")


def _losses(workdir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in read_metrics_jsonl(workdir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference_run(setup, flags, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("one_step") / "run"
    done = run_train(setup, workdir, *flags, device_count=2, variants=VARIANTS)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def _restore(workdir: Path, step: int):
    """(config, graphdefs, initial state, restored state, frozen) of a one-step workdir, in-process."""
    import json

    from ml_collections import config_dict

    from xpsr_jax.training.checkpoint import TrainCheckpoints
    from xpsr_jax.training.one_step_train import create_one_step_state, load_one_step_networks
    from xpsr_jax.training.sharding import make_mesh

    config = config_dict.ConfigDict(json.loads((workdir / "config.json").read_text()))  # the resolved config
    mesh = make_mesh(config.mesh)
    initial, frozen, graphdefs = create_one_step_state(load_one_step_networks(config), config, mesh)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial)
    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=3, async_save=False)
    try:
        restored, _ = checkpoints.restore(step, target)
    finally:
        checkpoints.close()
    return config, graphdefs, initial, restored, frozen


def _held_out_batch(count: int = 4, size: int = 64):
    """HR crops in [-1, 1] and their x4-degraded LR, bicubic back to size, in [0, 1] (NHWC)."""
    rng = np.random.default_rng(1234)
    hr, lr = [], []
    for _ in range(count):
        image = textured_rgb(rng, size, size)
        small = image.reshape(size // 4, 4, size // 4, 4, 3).mean(axis=(1, 3)).astype(np.uint8)
        up = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
        hr.append(image / 127.5 - 1.0)
        lr.append(up / 255.0)
    return np.stack(hr).astype(np.float32), np.stack(lr).astype(np.float32)


def _held_out_l2(config, graphdefs, params, frozen) -> float:
    from xpsr_jax.models import load_clip_tokenizer, tokenize
    from xpsr_jax.models.lora import lora_scaling
    from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config
    from xpsr_jax.training.loss import encode_prompts
    from xpsr_jax.training.one_step import one_step_generate
    from xpsr_jax.training.one_step_train import merged_generator

    hr, lr = _held_out_batch()
    ids = tokenize(load_clip_tokenizer(config.pipeline.tokenizer_path), [""] * len(hr))
    schedule = noise_schedule_from_config(load_scheduler_config(config.base_model))
    scaling = lora_scaling(config.one_step.lora_rank, config.one_step.lora_alpha)
    nets = merged_generator(graphdefs, params, frozen, scaling)
    high, low = encode_prompts(nets.text_encoder, ids, ids)
    image, _ = one_step_generate(nets.unet, nets.controlnet, nets.vae, lr, high, low, None, noise_schedule=schedule)
    return float(np.mean(np.square(np.asarray(image) - hr)))


def test_one_step_training_runs_finite_and_lowers_the_held_out_loss(reference_run):
    workdir, done = reference_run
    curve = _losses(workdir)
    assert sorted(curve) == list(range(1, TOTAL_STEPS + 1))
    print("\none-step loss curve (step: loss / l2 / lpips / vsd / regulariser):")
    for step, values in curve.items():
        print(f"  {step}: " + " / ".join(f"{values[k]:.4f}" for k in LOSS_KEYS[:5]))
        assert all(np.isfinite(v) for v in values.values()), (step, values)
    assert "mesh: {'data': 2, 'fsdp': 1}" in done.stdout and "compiled the train step" in done.stdout
    config, graphdefs, initial, trained, frozen = _restore(workdir, TOTAL_STEPS)
    assert set(trained.params) == {"unet", "controlnet", "unet_lora", "vae_lora", "regulariser_lora"}
    moved = [name for name in trained.params
             if any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
                    zip(jax.tree.leaves(trained.params[name]), jax.tree.leaves(initial.params[name])))]
    assert sorted(moved) == sorted(trained.params), moved  # every group trained, the regulariser included
    before = _held_out_l2(config, graphdefs, initial.params, frozen)
    after = _held_out_l2(config, graphdefs, trained.params, frozen)
    print(f"held-out pixel MSE: initial {before:.5f}, after {TOTAL_STEPS} steps {after:.5f}")
    assert after < before


def test_sigkill_then_the_same_command_resumes_to_the_same_parameters(setup, flags, reference_run,  # noqa: F811
                                                                      tmp_path):
    reference_workdir, _ = reference_run
    workdir = tmp_path / "run"
    killed = run_and_signal(setup, workdir, *flags, after_step=7, signal_number=signal.SIGKILL, device_count=2,
                            variants=VARIANTS)
    assert killed.returncode == -signal.SIGKILL
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < TOTAL_STEPS, saved
    finished = run_train(setup, workdir, *flags, device_count=2, variants=VARIANTS)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"steps: {saved[-1]} -> {TOTAL_STEPS} (resumed)" in finished.stdout
    reference, resumed = _losses(reference_workdir), _losses(workdir)
    for step in range(1, TOTAL_STEPS + 1):
        for key in LOSS_KEYS:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), (step, key)
    _, _, _, ours, _ = _restore(workdir, TOTAL_STEPS)
    _, _, _, theirs, _ = _restore(reference_workdir, TOTAL_STEPS)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- export and inference

@pytest.fixture(scope="module")
def release(reference_run, setup, tmp_path_factory):  # noqa: F811
    from xpsr_jax.export.torch_layout import export_torch_layout, resolve_checkpoint

    out = tmp_path_factory.mktemp("one_step_release") / "release"
    export_torch_layout(resolve_checkpoint(reference_run[0]), out)
    return out


def test_export_writes_a_release_that_infer_runs_over_real_photos(release, setup, tmp_path):  # noqa: F811
    import json
    import subprocess
    import sys

    from xpsr_jax.data import images as image_io
    from xpsr_jax.examples import write_test_set
    from xpsr_jax.weights.formats import ONE_STEP_RECORD, VAE_ENCODER_LORA

    record = json.loads((release / ONE_STEP_RECORD).read_text())
    assert record["timestep"] == 999 and record["vae_encoder_lora"]["rank"] == 4
    assert (release / VAE_ENCODER_LORA).is_file() and (release / "unet").is_dir() and (release / "controlnet").is_dir()
    test_set = write_test_set(tmp_path / "photos")  # the packaged photos, x1/4, with their prompts
    out = tmp_path / "out"
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "xpsr_jax.infer", "--weights", str(release), "--sd15", str(setup.sd15),
            "--input", str(test_set)]
    done = subprocess.run(base + ["--output", str(out), "--config", "infer.py:tiny,one_step"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lr_paths = sorted((test_set / "LR").iterdir())
    assert len(lr_paths) == 4
    for lr_path in lr_paths:
        lr = image_io.read_rgb(lr_path)
        sr = image_io.read_rgb(out / f"{lr_path.stem}.png")
        assert sr.shape == (4 * lr.shape[0], 4 * lr.shape[1], 3), (lr_path.name, lr.shape, sr.shape)
    # one-step weights with the sampling recipe: refused in one line, nothing written
    refused = subprocess.run(base + ["--output", str(tmp_path / "refused"), "--config", "infer.py:tiny"], env=env,
                             capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2 and "one-step XPSR weights" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
    # an export that would drop the VAE-encoder LoRA is refused, not written
    from xpsr_jax.export.inference_checkpoint import export_inference_checkpoint
    from xpsr_jax.export.output import ExportError
    with pytest.raises(ExportError, match="one-step XPSR release"):
        export_inference_checkpoint(release, tmp_path / "orbax")
    assert not (tmp_path / "orbax").exists()


def test_exported_release_matches_the_pytorch_reference(release, setup):  # noqa: F811
    """The exported release through XPSRPipeline (init "one_step") against the PyTorch replay of
    OSEDiff's inference lines on the same files: XPSR reference networks, diffusers' VAE with the
    release's peft LoRA loaded by peft, transformers' CLIP, the same posterior draw."""
    import json

    import diffusers
    import torch
    import transformers
    from peft import LoraConfig, inject_adapter_in_model

    from tests.helpers.parity_utils import nchw_to_nhwc, nhwc_to_nchw
    from tests.helpers.torch_pipeline import load_release_torch
    from tests.torch_reference import one_step as reference_lines
    from xpsr_jax.configs import infer as infer_configs
    from xpsr_jax.inference.pipeline import XPSRPipeline
    from xpsr_jax.inference.sampling import SamplingNoise
    from xpsr_jax.weights.files import read_state_dict
    from xpsr_jax.weights.formats import ONE_STEP_RECORD, VAE_ENCODER_LORA

    config = infer_configs.get_config("tiny,one_step")
    config.tiling.enabled = False
    pipe = XPSRPipeline.from_pretrained(release, setup.sd15, config)
    rng = np.random.default_rng(3)
    conditioning = np.stack([textured_rgb(rng, 64, 64)])
    caption, quality = "a red brick house", "slightly blurry, noisy"
    vae_sample = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    zeros = np.zeros_like(vae_sample)
    ours = pipe.sample(conditioning, pipe.encode_prompts([caption], [quality]),
                       noise=SamplingNoise(vae_sample, zeros, zeros, None))

    unet, controlnet = load_release_torch(release)
    vae = diffusers.AutoencoderKL.from_pretrained(setup.sd15, subfolder="vae").eval()
    lora = json.loads((release / ONE_STEP_RECORD).read_text())["vae_encoder_lora"]
    inject_adapter_in_model(LoraConfig(r=lora["rank"], lora_alpha=lora["lora_alpha"], init_lora_weights="gaussian",
                                       target_modules=lora["target_modules"]), vae, adapter_name=lora["adapter_name"])
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in read_state_dict(release / VAE_ENCODER_LORA).items()}
    result = vae.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k]
    text_encoder = transformers.CLIPTextModel.from_pretrained(setup.sd15, subfolder="text_encoder").eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(setup.sd15, subfolder="tokenizer")
    scheduler = reference_lines.one_step_scheduler(diffusers.DDPMScheduler.from_pretrained(setup.sd15,
                                                                                           subfolder="scheduler"))
    with torch.no_grad():
        def embed(text):
            ids = tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            return text_encoder(ids.input_ids)[0]

        image, latents = reference_lines.generator_forward(
            vae, unet, controlnet, scheduler, torch.from_numpy(nhwc_to_nchw(conditioning / 255.0)).float(),
            embed(caption), embed(quality), torch.from_numpy(nhwc_to_nchw(vae_sample)))
    for name, got, expected in (("latents", ours.latents, nchw_to_nhwc(latents.numpy())),
                                ("image", np.clip(ours.decoded, -1, 1), nchw_to_nhwc(image.numpy()))):
        error = np.abs(got - expected).max()
        print(f"one-step release parity {name}: max-abs {error:.2e} (scale {np.abs(expected).max():.2f})")
        assert error <= 1e-3, (name, error)
    assert np.abs(ours.latents - ours.latents_init).max() > 0.1  # the pass changed the LR latent
    # The trained VAE-encoder LoRA matters at these tolerances (so leaving it out would fail above).
    plain = diffusers.AutoencoderKL.from_pretrained(setup.sd15, subfolder="vae").eval()
    pixels = torch.from_numpy(nhwc_to_nchw(conditioning / 127.5 - 1.0)).float()
    with torch.no_grad():
        moved = (vae.encode(pixels).latent_dist.mean - plain.encode(pixels).latent_dist.mean).abs().max().item()
    print(f"VAE-encoder LoRA moves the posterior mean by {moved:.2e}")
    assert moved > 1e-2
