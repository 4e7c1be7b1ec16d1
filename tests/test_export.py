"""`python -m xpsr_jax.export torch|orbax`: training checkpoint -> official PyTorch layout ->
inference-only orbax checkpoint, their use as `infer.py --weights` and `init_from`, resharding,
and the error paths (each leaving no partial output).

One tiny model (layers_per_block=1) and TFDS dataset per module. The training checkpoint of
tests is made without compiling a train step (create_train_state, then random perturbations of
the trainable weights). The one test that runs the real loop (2 steps at learning rate 0, then
export: the release's bytes back) compiles the train step, so it lives in
tests/end_to_end/test_export.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tests.helpers.parity_utils import assert_parity, nchw_to_nhwc, nhwc_to_nchw  # noqa: E402
from tests.helpers.train_cli_fixtures import REPO, build_tiny_setup  # noqa: E402
from tests.helpers.train_cli_fixtures import tiny_config as fixture_config  # noqa: E402
from tests.torch_reference import XPSRControlNetTorch, XPSRUNetTorch  # noqa: E402
from xpsr_jax.export import inference_checkpoint as orbax_export  # noqa: E402
from xpsr_jax.export import torch_layout  # noqa: E402
from xpsr_jax.export.cli import main  # noqa: E402
from xpsr_jax.models.loading import abstract_network, load_inference_checkpoint  # noqa: E402
from xpsr_jax.training import config as train_config  # noqa: E402
from xpsr_jax.training.checkpoint import TrainCheckpoints  # noqa: E402
from xpsr_jax.weights import files as weight_files  # noqa: E402
from xpsr_jax.weights import fingerprints  # noqa: E402
from xpsr_jax.weights import formats as weight_formats  # noqa: E402
from xpsr_jax.weights.convert import module_state_dict  # noqa: E402
from xpsr_jax.weights.files import read_state_dict, write_state_dict  # noqa: E402
from xpsr_jax.weights.formats import MANIFEST, ORBAX_INFERENCE, RELEASE, detect_weights_format  # noqa: E402

NETWORKS = ("unet", "controlnet")
WEIGHTS = "diffusion_pytorch_model.safetensors"
STEP = 7
ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("export"))


def tiny_config(setup, **overrides):
    """The tiny training config, initialised from the tiny release, resolved."""
    return train_config.resolve_train_config(fixture_config(setup, **{"init_from": str(setup.xpsr), **overrides}))


def state_dicts(models) -> dict[str, dict[str, np.ndarray]]:
    return {name: module_state_dict(model) for name, model in zip(NETWORKS, models)}


def release_tensors(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {name: read_state_dict(folder / name / WEIGHTS) for name in NETWORKS}


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    """Bit for bit: same keys, dtypes, shapes and bytes."""
    for name in NETWORKS:
        assert sorted(ours[name]) == sorted(theirs[name]), name
        for key, value in ours[name].items():
            other = theirs[name][key]
            assert value.dtype == other.dtype and value.shape == other.shape, (name, key)
            assert value.tobytes() == other.tobytes(), f"{name}: {key} differs"


def assert_no_output(out: Path) -> None:
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    assert not out.exists() and not leftovers, (out, leftovers)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- a training checkpoint


class TrainCheckpoint(NamedTuple):
    workdir: Path
    config: dict  # the resolved config stored in the checkpoint
    params: tuple  # (unet, controlnet): the merged JAX networks of the checkpoint's params
    ema: tuple  # likewise for its EMA weights


def _perturbed(tree, seed: int):
    """Every leaf plus noise of 0.05 x its std (host-side: no compilation per shape)."""
    rng = np.random.default_rng(seed)

    def one(x):
        value = np.asarray(x)
        noise = rng.standard_normal(value.shape).astype(value.dtype) * np.float32(0.05 * (value.std() + 1e-3))
        return jax.device_put(value + noise, x.sharding)

    return jax.tree.map(one, tree)


@pytest.fixture(scope="module")
def train_checkpoint(setup, tmp_path_factory) -> TrainCheckpoint:
    """A checkpoint as the loop writes it (state + meta), with trainable weights and EMA that differ
    from the base, made without compiling the train step."""
    from xpsr_jax.training.loop import STATE_VERSION
    from xpsr_jax.training.models import load_training_models
    from xpsr_jax.training.sharding import make_mesh
    from xpsr_jax.training.step import create_train_state, merge_models

    workdir = tmp_path_factory.mktemp("train_workdir")
    config = tiny_config(setup, **{"optimizer.ema_decay": 0.5})
    models = load_training_models(config.base_model, config.init_from, config.model.to_dict(),
                                  attention_backend="xla")
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    state, frozen, graphdefs = create_train_state(models, config, mesh)
    state = state.replace(params=_perturbed(state.params, 1), ema_params=_perturbed(state.params, 2))
    stored_config = json.loads(train_config.config_to_json(config))
    meta = {"version": STATE_VERSION, "step": STEP, "data_position": STEP * 2, "global_batch_size": 2,
            "process_count": 1, "frozen_base": train_config.frozen_base_reference(config),
            "config": stored_config}
    train_config.write_workdir_config(config, workdir)
    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=2)
    checkpoints.save(STEP, state, meta)
    checkpoints.close()
    merged = merge_models(graphdefs, state.params, frozen)
    merged_ema = merge_models(graphdefs, state.ema_params, frozen)
    return TrainCheckpoint(workdir, stored_config, (merged.unet, merged.controlnet),
                           (merged_ema.unet, merged_ema.controlnet))


@pytest.fixture(scope="module")
def torch_export(train_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torch_export") / "release"
    assert main(["torch", "--workdir", str(train_checkpoint.workdir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def orbax_checkpoint(setup, tmp_path_factory) -> Path:
    """The tiny release as a self-contained inference checkpoint (written on 1 device)."""
    out = tmp_path_factory.mktemp("orbax_export") / "xpsr-orbax"
    assert main(["orbax", "--weights", str(setup.xpsr), "--sd15", str(setup.sd15), "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- round trips


def _reference_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=generator), timesteps=torch.tensor([7, 801]),
                high=torch.randn(2, 6, 24, generator=generator), low=torch.randn(2, 5, 24, generator=generator),
                cond=torch.rand(2, 3, 64, 64, generator=generator))


def _jax_outputs(unet, controlnet, x):
    """ControlNet, then the UNet with its residuals (one jit), NCHW numpy outputs."""
    unet_def, unet_state = nnx.split(unet)
    controlnet_def, controlnet_state = nnx.split(controlnet)

    @jax.jit
    def forward(unet_state, controlnet_state, sample, timesteps, high, low, cond):
        out = nnx.merge(controlnet_def, controlnet_state)(sample, timesteps, high, low, cond, 0.7)
        eps = nnx.merge(unet_def, unet_state)(sample, timesteps, high, low, out.down_block_res_samples,
                                              out.mid_block_res_sample)
        return out, eps

    j = lambda t, nhwc=True: jnp.asarray(nchw_to_nhwc(t.numpy()) if nhwc else t.numpy())  # noqa: E731
    return forward(unet_state, controlnet_state, j(x["sample"]), j(x["timesteps"], False), j(x["high"], False),
                   j(x["low"], False), j(x["cond"]))


def test_training_checkpoint_to_torch_layout_matches_the_reference(train_checkpoint, torch_export, setup):
    out = torch_export
    assert detect_weights_format(out) == RELEASE
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["step"] == STEP and manifest["ema"] is False and manifest["dtype"] == "float32"
    assert manifest["config"] == train_checkpoint.config
    assert manifest["frozen_base"]["init_from"] == str(setup.xpsr)
    for relative, digest in manifest["checksums"].items():
        assert weight_formats.sha256_file(out / relative) == digest, relative
    assert sorted(manifest["checksums"]) == sorted(f"{n}/{f}" for n in NETWORKS for f in ("config.json", WEIGHTS))
    for name in NETWORKS:  # the release the run started from: config.json byte for byte
        assert (out / name / "config.json").read_bytes() == (setup.xpsr / name / "config.json").read_bytes()

    exported = release_tensors(out)
    assert_same_tensors(exported, state_dicts(train_checkpoint.params))
    release = release_tensors(setup.xpsr)
    # Trainable tensors moved, frozen ones are the base's bytes.
    moved = {name: sorted(k for k in exported[name] if not np.array_equal(exported[name][k], release[name][k]))
             for name in NETWORKS}
    assert len(moved["controlnet"]) == len(exported["controlnet"])
    assert moved["unet"] and all("pixel_attentions" in k for k in moved["unet"])
    assert len(moved["unet"]) < len(exported["unet"])

    # The PyTorch reference loads it strictly and computes what our merged networks compute.
    reference = {}
    for name, cls in (("unet", XPSRUNetTorch), ("controlnet", XPSRControlNetTorch)):
        model = cls(json.loads((out / name / "config.json").read_text())).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in exported[name].items()}, strict=True)
        reference[name] = model
    x = _reference_inputs()
    with torch.no_grad():
        expected = reference["controlnet"](x["sample"], x["timesteps"], x["high"], x["low"], x["cond"],
                                           conditioning_scale=0.7)
        expected_eps = reference["unet"](x["sample"], x["timesteps"], x["high"], x["low"],
                                         expected.down_block_res_samples, expected.mid_block_res_sample)
    ours, eps = _jax_outputs(*train_checkpoint.params, x)
    for i, (a, b) in enumerate(zip(ours.down_block_res_samples, expected.down_block_res_samples, strict=True)):
        assert_parity(nhwc_to_nchw(a), b.numpy(), atol=ATOL, label=f"residual {i}")
    assert_parity(nhwc_to_nchw(ours.mid_block_res_sample), expected.mid_block_res_sample.numpy(), atol=ATOL,
                  label="mid residual")
    for i, (a, b) in enumerate(zip(ours.rgb_preds, expected.rgb_preds, strict=True)):
        assert_parity(nhwc_to_nchw(a), b.numpy(), atol=ATOL, label=f"rgb head {i}")
    assert_parity(nhwc_to_nchw(eps), expected_eps.numpy(), atol=ATOL, label="UNet with residuals")


def test_checkpoint_of_a_run_from_sd15_merges_with_the_sd_unet(setup, tmp_path, capsys):
    """init_from "": the frozen UNet part is base_model's SD UNet; the configs are the ones the
    official rule derives (from_sd_unet; from_unet with its default pyramid widths)."""
    from xpsr_jax.models import (
        AutoencoderKL,
        CLIPTextEncoder,
        UNet2DCondition,
        XPSRControlNet,
        XPSRUNet,
        XPSRUNetConfig,
        tiny,
    )
    from xpsr_jax.models.xpsr_init import apply_official_init
    from xpsr_jax.training.models import XPSRModels
    from xpsr_jax.training.sharding import make_mesh
    from xpsr_jax.training.step import create_train_state
    from xpsr_jax.weights.pretrained import eval_shape_model

    sd_unet = UNet2DCondition.from_pretrained(setup.sd15, subfolder="unet")
    unet_config = XPSRUNetConfig.from_sd(sd_unet.config)  # XPSRUNet.from_sd_unet's config
    unet = tiny.randomized(abstract_network(XPSRUNet, unet_config), seed=5, network="unet")
    unet, _ = apply_official_init(unet, module_state_dict(sd_unet), source_name="SD UNet")
    abstract = eval_shape_model(lambda: XPSRControlNet.from_unet(unet, rngs=nnx.Rngs(0),
                                                                 load_weights_from_unet=False)[0])
    controlnet = tiny.randomized(abstract, seed=5, network="controlnet")  # all trainable: any values
    models = XPSRModels(unet, controlnet, AutoencoderKL.from_pretrained(setup.sd15, subfolder="vae"),
                        CLIPTextEncoder.from_pretrained(setup.sd15, subfolder="text_encoder"))
    config = tiny_config(setup, init_from="")
    state, _, _ = create_train_state(models, config, make_mesh(config.mesh, jax.devices()[:1]))
    meta = {"step": 3, "frozen_base": train_config.frozen_base_reference(config),
            "config": json.loads(train_config.config_to_json(config))}
    checkpoints = TrainCheckpoints(tmp_path / "run" / "checkpoints", keep=1)
    checkpoints.save(3, state, meta)
    checkpoints.close()

    code, err = run_cli(capsys, "torch", "--workdir", tmp_path / "run", "--out", tmp_path / "out")
    assert code == 0, err
    assert_same_tensors(release_tensors(tmp_path / "out"), state_dicts((unet, controlnet)))
    for name, model in (("unet", unet), ("controlnet", controlnet)):
        written = json.loads((tmp_path / "out" / name / "config.json").read_text())
        assert written == json.loads(json.dumps(model.config.to_dict())), name
    assert json.loads((tmp_path / "out" / "controlnet" / "config.json").read_text())[
        "conditioning_embedding_out_channels"] == [16, 32, 96, 256]
    exported = release_tensors(tmp_path / "out")
    for name, cls in (("unet", XPSRUNetTorch), ("controlnet", XPSRControlNetTorch)):
        model = cls(json.loads((tmp_path / "out" / name / "config.json").read_text()))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in exported[name].items()}, strict=True)
    # Another base_model than the run's: refused, naming it.
    code, err = run_cli(capsys, "torch", "--workdir", tmp_path / "run", "--base-model", setup.xpsr,
                        "--out", tmp_path / "other")
    assert code == 2 and f"base_model {str(setup.xpsr)!r} does not match the checkpoint" in err, err
    assert_no_output(tmp_path / "other")


def test_torch_layout_to_orbax_is_bit_exact(torch_export, tmp_path, capsys):
    out = tmp_path / "orbax"
    code, err = run_cli(capsys, "orbax", "--weights", torch_export, "--out", out)
    assert code == 0, err
    assert detect_weights_format(out) == ORBAX_INFERENCE and not (out / "opt_state").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"] == str(torch_export) and manifest["step"] == STEP
    assert manifest["source_manifest"]["config"]["init_from"]  # the training provenance travels along
    for name in NETWORKS:
        assert (out / name / "config.json").read_bytes() == (torch_export / name / "config.json").read_bytes()
    assert_same_tensors(state_dicts(load_inference_checkpoint(out)), release_tensors(torch_export))


def test_ema_and_half_precision_exports(train_checkpoint, torch_export, tmp_path, capsys):
    import ml_dtypes

    code, err = run_cli(capsys, "torch", "--checkpoint", train_checkpoint.workdir / "checkpoints" / str(STEP),
                        "--ema", "--dtype", "bfloat16", "--out", tmp_path / "ema")
    assert code == 0, err
    manifest = json.loads((tmp_path / "ema" / MANIFEST).read_text())
    assert manifest["ema"] is True and manifest["dtype"] == "bfloat16"
    exported = release_tensors(tmp_path / "ema")
    expected = {name: {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
                for name, tensors in state_dicts(train_checkpoint.ema).items()}
    assert_same_tensors(exported, expected)
    params = release_tensors(torch_export)
    assert not np.array_equal(exported["controlnet"]["conv_in.weight"].astype(np.float32),
                              params["controlnet"]["conv_in.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))
    # The official classes read bfloat16 files too.
    model = XPSRControlNetTorch(json.loads((tmp_path / "ema" / "controlnet" / "config.json").read_text()))
    state = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in exported["controlnet"].items()}
    model.load_state_dict(state, strict=True)


def test_inference_checkpoint_reshards_between_one_and_four_devices(setup, orbax_checkpoint, tmp_path):
    out = tmp_path / "saved_on_4"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "tests.helpers.export_multidevice", str(orbax_checkpoint),
                           str(setup.xpsr), str(out)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert counts["sharded"] > 0 and counts["replicated"] > 0
    # Written from arrays sharded over 4 devices; restored here on one (and replicated by request).
    device = jax.devices()[0]
    networks = load_inference_checkpoint(out, sharding=jax.sharding.SingleDeviceSharding(device))
    for leaf in jax.tree.leaves(nnx.state(networks[0], nnx.Param)):
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(device)
    assert_same_tensors(state_dicts(networks), release_tensors(setup.xpsr))


def test_infer_and_training_accept_the_orbax_checkpoint(setup, orbax_checkpoint):
    import ml_dtypes

    from xpsr_jax.inference.pipeline import load_sampling_networks, resolve_sd15
    from xpsr_jax.training.models import load_training_models

    release = release_tensors(setup.xpsr)
    assert_same_tensors(state_dicts(load_sampling_networks(orbax_checkpoint)), release)
    assert resolve_sd15(orbax_checkpoint, None) == orbax_checkpoint  # self-contained with --sd15
    manifest = json.loads((orbax_checkpoint / MANIFEST).read_text())
    assert manifest["checksums"]["vae/" + WEIGHTS] == weight_formats.sha256_file(setup.sd15 / "vae" / WEIGHTS)
    for relative, digest in manifest["checksums"].items():
        assert weight_formats.sha256_file(orbax_checkpoint / relative) == digest, relative
    unet, _ = load_sampling_networks(orbax_checkpoint, param_dtype=jnp.bfloat16)
    bf16 = module_state_dict(unet)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in bf16.values())
    assert all(np.array_equal(bf16[k], v.astype(ml_dtypes.bfloat16)) for k, v in release["unet"].items())

    models = load_training_models(str(setup.sd15), str(orbax_checkpoint), attention_backend="xla")
    assert_same_tensors(state_dicts((models.unet, models.controlnet)), release)
    config = tiny_config(setup, init_from=str(orbax_checkpoint))
    train_config.validate_train_config(config)
    reference = train_config.frozen_base_reference(config)
    assert reference["init_from_sha256"] == fingerprints.tree_fingerprint(orbax_checkpoint)
    assert reference["init_from_sha256"] != fingerprints.init_from_fingerprint(setup.xpsr)


# ----------------------------------------------------------------------------- errors


def _copy_checkpoint(train_checkpoint, root: Path, edit) -> Path:
    """A copy of the training checkpoint step folder with its meta changed by `edit(meta)`."""
    step = root / "ckpt" / str(STEP)
    shutil.copytree(train_checkpoint.workdir / "checkpoints" / str(STEP), step)
    meta_path = step / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    return step


def test_wrong_folder_types_are_reported(setup, orbax_checkpoint, train_checkpoint, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    out = tmp_path / "out"
    cases = [
        (("orbax", "--weights", tmp_path / "junk"), f"{tmp_path / 'junk'}: not XPSR weights"),
        (("orbax", "--weights", orbax_checkpoint), f"{orbax_checkpoint}: is a 'orbax-inference' export"),
        (("orbax", "--weights", setup.xpsr, "--sd15", setup.xpsr), f"{setup.xpsr}: not an SD 1.5 folder"),
        (("torch", "--checkpoint", setup.xpsr), f"{setup.xpsr}: not an orbax training checkpoint step folder"),
        (("torch", "--workdir", tmp_path / "junk"), f"{tmp_path / 'junk' / 'checkpoints'}: no finished training"),
        (("torch", "--workdir", train_checkpoint.workdir, "--step", 3),
         "no checkpoint of step 3; finished steps: [7]"),
    ]
    for argv, message in cases:
        code, err = run_cli(capsys, *argv, "--out", out)
        assert code == 2 and message in err, (argv, err)
        assert_no_output(out)


def test_missing_base_weights_are_reported(train_checkpoint, tmp_path, capsys):
    gone = str(tmp_path / "moved-away")
    step = _copy_checkpoint(train_checkpoint, tmp_path, lambda meta: meta["frozen_base"].update(init_from=gone))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "torch", "--checkpoint", step, "--out", out)
    assert code == 2 and f"init_from {gone!r}: no such folder; the checkpoint {step}" in err, err
    assert "--init-from" in err
    assert_no_output(out)


def test_a_base_that_does_not_match_the_checkpoint_is_reported(setup, train_checkpoint, tmp_path, capsys):
    altered = tmp_path / "altered"
    shutil.copytree(setup.xpsr, altered)
    tensors = read_state_dict(altered / "unet" / WEIGHTS)
    tensors["conv_in.weight"] = tensors["conv_in.weight"] + np.float32(1e-3)  # a frozen tensor
    write_state_dict(altered / "unet" / WEIGHTS, tensors)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "torch", "--workdir", train_checkpoint.workdir, "--init-from", altered,
                        "--out", out)
    assert code == 2 and f"init_from {str(altered)!r} does not match the checkpoint" in err, err
    assert_no_output(out)

    # Same weights, but the checkpoint's config builds another UNet: named before anything is written.
    step = _copy_checkpoint(train_checkpoint, tmp_path, lambda meta: meta["config"]["model"].update(
        mid_use_lowlevel_prompt=True))
    code, err = run_cli(capsys, "torch", "--checkpoint", step, "--out", out)
    assert code == 2 and "mid_use_lowlevel_prompt" in err and str(setup.xpsr) in err, err
    assert_no_output(out)


def test_not_enough_free_disk_is_reported_before_writing(setup, train_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    for argv in (("torch", "--workdir", train_checkpoint.workdir), ("orbax", "--weights", setup.xpsr)):
        out = tmp_path / argv[0]
        code, err = run_cli(capsys, *argv, "--out", out)
        assert code == 2 and f"{out}: not enough free disk" in err and "0.0 MiB free" in err, err
        assert_no_output(out)


def test_a_failure_mid_write_leaves_no_partial_output(setup, train_checkpoint, tmp_path, capsys, monkeypatch):
    written = []
    original = weight_files.write_state_dict

    def fail_second(path, state):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        original(path, state)

    monkeypatch.setattr(torch_layout, "write_state_dict", fail_second)
    out = tmp_path / "torch"
    code, err = run_cli(capsys, "torch", "--workdir", train_checkpoint.workdir, "--out", out)
    assert code == 2 and f"{out}: writing the release failed" in err and "No space left" in err, err
    assert len(written) == 1 and written[0].name == WEIGHTS  # the unet file was written, then removed
    assert_no_output(out)

    def fail_checksums(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(orbax_export, "folder_checksums", fail_checksums)  # after state/ is written
    out = tmp_path / "orbax"
    code, err = run_cli(capsys, "orbax", "--weights", setup.xpsr, "--out", out)
    assert code == 2 and f"{out}: writing the checkpoint failed" in err, err
    assert_no_output(out)


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def test_overwrite_never_destroys_an_input(setup, train_checkpoint, torch_export, tmp_path, capsys):
    """--out that is, contains or lies inside an input is refused, --overwrite or not, and --overwrite
    replaces only an earlier export: the training workdir (real checkpoints) stays byte for byte."""
    workdir = train_checkpoint.workdir
    step = workdir / "checkpoints" / str(STEP)
    before, beside = _listing(workdir), _listing(workdir.parent)
    cases = [
        (("torch", "--workdir", workdir, "--out", workdir), f"--out {workdir} contains the export's input {step}"),
        (("torch", "--workdir", workdir, "--out", workdir.parent), f"--out {workdir.parent} contains"),
        (("torch", "--checkpoint", step, "--out", step), f"--out {step} is the export's input {step}"),
        (("torch", "--checkpoint", step, "--out", step / "state"), f"--out {step / 'state'} lies inside"),
        (("orbax", "--weights", setup.xpsr, "--out", setup.xpsr), f"--out {setup.xpsr} is the export's input"),
        (("orbax", "--weights", torch_export, "--sd15", setup.sd15, "--out", setup.sd15 / "vae"),
         f"--out {setup.sd15 / 'vae'} lies inside the export's input {setup.sd15}"),
    ]
    for argv, message in cases:
        code, err = run_cli(capsys, *argv, "--overwrite")
        assert code == 2 and message in err and "choose an --out outside it" in err, (argv, err)
    assert _listing(workdir) == before and _listing(workdir.parent) == beside

    # An existing folder that no export wrote is not replaced; an earlier export is.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "torch", "--workdir", workdir, "--out", notes, "--overwrite")
    assert code == 2 and f"{notes}: exists and is not an xpsr-jax export" in err, err
    assert (notes / "keep.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    shutil.copytree(torch_export, earlier)
    (earlier / "stale.txt").write_text("from the earlier export")
    code, err = run_cli(capsys, "torch", "--workdir", workdir, "--out", earlier, "--overwrite")
    assert code == 0, err
    assert not (earlier / "stale.txt").exists() and detect_weights_format(earlier) == RELEASE
    assert _listing(workdir) == before


def test_a_killed_export_leaves_nothing_the_next_run_keeps(setup, train_checkpoint, tmp_path, capsys):
    """Staging folders of a dead export on this host are removed by the next export to the same
    --out; a live process's and another host's are left alone."""
    from xpsr_jax.export import output

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "release"
    stale = tmp_path / f".release.partial-{output._host()}-{dead_pid}-abc123"
    live = tmp_path / f".release.partial-{output._host()}-{os.getpid()}-def456"
    other_host = tmp_path / f".release.partial-elsewhere-{dead_pid}-ghi789"
    unrelated = tmp_path / f".other.partial-{output._host()}-{dead_pid}-x"
    for folder in (stale, live, other_host, unrelated):
        folder.mkdir()
        (folder / "unet.safetensors").write_bytes(b"\0" * 1024)
    code, err = run_cli(capsys, "torch", "--workdir", train_checkpoint.workdir, "--out", out)
    assert code == 0, err
    assert not stale.exists() and live.exists() and other_host.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".release.")) == sorted(
        [live.name, other_host.name])
