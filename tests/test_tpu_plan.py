"""`python -m xpsr_jax.tpu_plan`: our programs compiled by XLA:TPU (libtpu, the [tpu] extra) for a
v5e:2x2 topology on this CPU machine, and what a pod run depends on read off the compiled
programs: they fit; the gradients are all-reduced (or reduce-scattered with fsdp) at about the
trainable parameters' bytes; with fsdp 4 each chip holds about a quarter of the trainable state;
the splash kernel is in the program when chosen. Each program compiles once per test (a few
minutes each on 2 cores); the HLO parser and the libtpu set-up have quick tests of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xpsr_jax.platforms import libtpu_installed
from xpsr_jax.tpu_plan.analysis import collectives, custom_calls, resource_exhausted

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(not libtpu_installed(), reason='needs the [tpu] extra: pip install -e ".[tpu]"')


def plans(tmp_path: Path, runs: dict[str, list[str]], code: int = 0) -> dict[str, dict]:
    """Each run of the command in a fresh process (as a user runs it), all at once; their JSON."""
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    started = {name: subprocess.Popen([sys.executable, "-m", "xpsr_jax.tpu_plan", "--topology", "v5e:2x2", *argv,
                                       "--json", str(tmp_path / f"{name}.json")], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, argv in runs.items()}
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=1800)
        assert process.returncode == code, out[-3000:] + err[-3000:]
        for noise in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "InitGoogle", "Traceback"):
            assert noise not in out + err, err[-3000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    return results


def tiny_run_shapes() -> tuple[int, int, int]:
    """(bytes of the trainable parameters, of those the fsdp rule splits over 4 chips, of the frozen
    ones) of the tiny run, counted here from the networks' shapes, independently of the plan."""
    import jax

    from xpsr_jax.configs.train import get_config
    from xpsr_jax.models.architectures import architecture
    from xpsr_jax.training.abstract import abstract_training_models
    from xpsr_jax.training.sharding import fsdp_partition_spec
    from xpsr_jax.training.step import split_models

    _, trainable, frozen = split_models(abstract_training_models(architecture("tiny"), get_config("tiny")))

    def size(leaf) -> int:
        return int(np.prod(leaf.shape)) * leaf.dtype.itemsize

    leaves = jax.tree.leaves(trainable)
    split = sum(size(leaf) for leaf in leaves if fsdp_partition_spec(tuple(leaf.shape), 4) != ())
    return sum(map(size, leaves)), split, sum(map(size, jax.tree.leaves(frozen)))


@needs_libtpu
def test_the_tiny_train_step_on_v5e_data_parallel_and_with_fsdp_4(tmp_path):
    results = plans(tmp_path, {
        "dp": ["--program", "train", "--config", "configs/train.py:tiny", "--config.attention_backend=splash"],
        "fsdp": ["--program", "train", "--config", "configs/train.py:tiny", "--config.mesh.fsdp=4",
                 "--config.mesh.shard_trainable=True"]})
    trainable, split, _ = tiny_run_shapes()
    for result in results.values():
        assert result["fits"] and result["topology"]["chips"] == 4 and result["topology"]["hosts"] == 1
        assert 0 < result["figures"]["memory"]["total"] <= result["topology"]["hbm_bytes_per_chip"]
        assert result["figures"]["flops"] > 0
    dp, fsdp = results["dp"]["figures"], results["fsdp"]["figures"]
    # Data parallel: the fp32 gradients of every trainable tensor are all-reduced once per step,
    # and nothing else crosses chips (no token ids, no activations).
    assert dp["collectives"]["all-reduce"]["bytes"] == pytest.approx(trainable, rel=0.02)
    assert dp["collectives"]["collective-permute"]["count"] == 0
    assert dp["custom_calls"].get("tpu_custom_call", 0) > 0  # the splash kernel is in the program
    assert fsdp["custom_calls"].get("tpu_custom_call", 0) == 0  # xla attention: no kernel
    # fsdp 4: params and Adam's two moments of the split tensors shrink to a quarter per chip (XLA's
    # arguments hold TPU tile padding, the same in both programs), the gradients are still summed.
    saved = dp["memory"]["arguments"] - fsdp["memory"]["arguments"]
    assert saved == pytest.approx(3 * split * 3 / 4, rel=0.1)
    reduced = fsdp["collectives"]["all-reduce"]["bytes"] + 4 * fsdp["collectives"]["reduce-scatter"]["bytes"]
    assert 0.5 * trainable <= reduced <= 1.25 * trainable


@needs_libtpu
def test_the_tiny_one_step_train_step_on_v5e_data_parallel(tmp_path):
    """The one-step objective's step (generator + regulariser, LPIPS, three SD UNet passes) for a
    pod: it fits, no example moves between chips (the guidance and LPIPS pairs stay per example),
    and its gradients (both groups, fp32) are all-reduced once. LoRA is merged into the kernels it
    adapts, so XLA all-reduces the merged kernels' gradients before contracting them to LoRA size:
    the volume lies between the trainable bytes and those plus the adapted kernels' bytes
    (docs/one_step.md, "On a pod")."""
    import jax
    from flax import nnx

    from xpsr_jax.configs.train import get_config
    from xpsr_jax.models.architectures import architecture
    from xpsr_jax.training.abstract import abstract_one_step_networks, abstract_one_step_state
    from xpsr_jax.training.one_step_train import lora_targets
    from xpsr_jax.training.sharding import make_mesh
    from xpsr_jax.weights.convert import torch_key

    result = plans(tmp_path, {"one_step": ["--program", "train", "--config", "configs/train.py:tiny,one_step"]})
    figures = result["one_step"]["figures"]
    assert result["one_step"]["fits"] and "one-step objective" in result["one_step"]["description"]
    config = get_config("tiny,one_step")
    networks = abstract_one_step_networks(architecture("tiny"), config)
    _, state, _ = abstract_one_step_state(networks, config, make_mesh(config.mesh, jax.devices()[:1]))
    assert set(state.params) == {"unet", "controlnet", "unet_lora", "vae_lora", "regulariser_lora"}
    trainable = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state.params))
    targets = lora_targets(networks)
    adapted = 0
    for module, names in ((networks.unet, targets.unet), (networks.vae, targets.vae),
                          (networks.sd_unet, targets.regulariser)):
        names = set(names)
        adapted += sum(int(np.prod(v.get_value().shape)) * 4 for path, v in nnx.to_flat_state(nnx.state(module))
                       if path[-1] == "kernel" and torch_key(tuple(path))[:-len(".weight")] in names)
    reduced = figures["collectives"]["all-reduce"]["bytes"]
    print(f"one-step all-reduce {reduced:,} bytes; trainable {trainable:,}; adapted kernels {adapted:,}")
    assert trainable * 0.98 <= reduced <= (trainable + adapted) * 1.02
    assert figures["collectives"]["collective-permute"]["count"] == 0
    assert figures["flops"] > 0


@needs_libtpu
def test_the_tiny_sampler_on_one_v5e_host(tmp_path):
    result = plans(tmp_path, {"sample": ["--program", "sample", "--config", "configs/infer.py:tiny",
                                         "--batch-per-chip", "2"]})["sample"]
    assert result["fits"] and result["batch_per_chip"] == 2
    figures = result["figures"]
    # Each chip samples its own images with replicated weights: no collective at all.
    assert sum(entry["count"] for entry in figures["collectives"].values()) == 0
    assert 0 < figures["memory"]["arguments"] < 2**30 and figures["flops"] > 0


@needs_libtpu
def test_bad_input_is_one_line(tmp_path):
    env = dict(os.environ)
    for argv, message in [(["--topology", "v9x:2x2"], "unknown TPU generation 'v9x'"),
                          (["--topology", "v5e:3x7"], "libtpu does not describe it"),
                          (["--topology", "v5e:2x2", "--batch-per-chip", "0"], "--batch-per-chip 0"),
                          (["--topology", "v5e:2x2", "--program", "sample", "--size", "30"], "--size '30'"),
                          (["--topology", "v5e:2x2", "--config.remat.unet=some"], "remat.unet='some'")]:
        done = subprocess.run([sys.executable, "-m", "xpsr_jax.tpu_plan", *argv], cwd=REPO, capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


HLO = """
  %all-reduce.1 = (f32[16]{0:T(128)}, bf16[8,4]{1,0}) all-reduce(%a, %b), channel_id=1, to_apply=%add
  %all-gather-start.2 = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%c), channel_id=2
  %all-gather-done.2 = f32[16,8]{1,0} all-gather-done(%all-gather-start.2)
  %collective-permute-start.3 = (s32[2,77]{1,0}, s32[2,77]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%d)
  %collective-permute-done.3 = s32[2,77]{1,0} collective-permute-done(%collective-permute-start.3)
  %reduce-scatter.4 = f32[4]{0} reduce-scatter(%e), dimensions={0}
  %fusion.5 = f32[4]{0} fusion(%f), kind=kLoop, calls=%fused
  %custom-call.6 = f32[4]{0} custom-call(%g), custom_call_target="tpu_custom_call"
"""


def test_the_hlo_reading():
    found = collectives(HLO)
    assert (found["all-reduce"].count, found["all-reduce"].bytes) == (1, 16 * 4 + 8 * 4 * 2)
    assert dict(found["all-reduce"].bytes_by_dtype) == {"f32": 64, "bf16": 64}
    assert (found["all-gather"].count, found["all-gather"].bytes) == (1, 16 * 8 * 4)  # the gathered result
    assert (found["collective-permute"].count, found["collective-permute"].bytes) == (1, 2 * 77 * 4)
    assert (found["reduce-scatter"].count, found["reduce-scatter"].bytes) == (1, 16)
    assert found["all-to-all"].count == 0
    assert custom_calls(HLO) == {"tpu_custom_call": 1}
    error = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                         "hbm. Used 26.01G of 15.75G hbm. Exceeded hbm capacity by 10.26G.")
    exhausted = resource_exhausted(error)
    assert exhausted.message.startswith("RESOURCE_EXHAUSTED") and exhausted.needed_bytes == int(26.01 * 2**30)
    assert exhausted.available_bytes == int(15.75 * 2**30)
    assert resource_exhausted(RuntimeError("INVALID_ARGUMENT: something else")) is None


@needs_libtpu
def test_libtpu_is_silent_and_does_not_lock_other_processes_out_on_a_machine_without_a_tpu():
    env = {key: value for key, value in os.environ.items()
           if key not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    script = ("import xpsr_jax, jax; from jax.experimental import topologies; "
              "print(jax.devices()[0].platform, len(topologies.get_topology_desc(platform='tpu', "
              "topology_name='v5e:2x2').devices))")
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # two at once
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and out.split() == ["cpu", "4"], err
        assert err.strip() == "", err
