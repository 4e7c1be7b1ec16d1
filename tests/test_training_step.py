"""The jitted, sharded train step: frozen weights untouched, updates, NaN guard, optimizer parity with
torch AdamW, and 4 simulated devices (data / fsdp sharding) reproducing one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from tests.helpers.training_fixtures import SFA_EVERYWHERE, fixed_batch, tiny_train_config, write_tiny_training_models  # noqa: E402
from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config  # noqa: E402
from xpsr_jax.training import (create_train_state, global_batch, load_training_models, make_mesh,  # noqa: E402
                               make_optimizer, make_train_step, memory_estimate, merge_models)
from xpsr_jax.training.optimizer import make_learning_rate_schedule  # noqa: E402
from xpsr_jax.training.sharding import fsdp_partition_spec, mesh_shape  # noqa: E402

TESTS = Path(__file__).parent
STEPS = 3


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three steps of the tiny setup on one device, compiled once."""
    root = tmp_path_factory.mktemp("tiny_step")
    write_tiny_training_models(root)
    config = tiny_train_config()
    models = load_training_models(str(root / "sd15"), str(root / "release"), SFA_EVERYWHERE, attention_backend="xla")
    schedule = noise_schedule_from_config(load_scheduler_config(root / "sd15" / "scheduler"))
    mesh = make_mesh(config.mesh)
    state, frozen, graphdefs = create_train_state(models, config, mesh)
    initial_params, initial_frozen = _host(state.params), _host(frozen)
    batch = global_batch(fixed_batch(4), mesh)
    step = make_train_step(config, graphdefs, schedule, mesh, state, frozen, batch)
    history, after_first = [], None
    for i in range(STEPS):
        state, metrics = step(state, frozen, batch)
        history.append({k: float(v) for k, v in metrics.items()})
        if i == 0:
            after_first = _flat(state.params)
    return dict(root=root, config=config, mesh=mesh, step=step, state=state, frozen=frozen, batch=batch,
                graphdefs=graphdefs, initial_params=initial_params, initial_frozen=initial_frozen,
                history=history, after_first=after_first)


def test_frozen_weights_stay_bit_identical_and_every_trainable_tensor_moves(run):
    state = run["state"]
    assert int(state.step) == STEPS
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(run["initial_frozen"]),
                                     jax.tree.leaves(run["frozen"])):
        np.testing.assert_array_equal(np.asarray(after), before, err_msg=jax.tree_util.keystr(path))
    unchanged = [jax.tree_util.keystr(p) for (p, before), after in
                 zip(jax.tree_util.tree_leaves_with_path(run["initial_params"]), jax.tree.leaves(state.params))
                 if np.array_equal(np.asarray(after), before)]
    assert not unchanged, f"trainable tensors that did not move: {unchanged[:5]}"
    # The merged models still hold the frozen weights (validation / export path).
    models = merge_models(run["graphdefs"], state.params, run["frozen"])
    assert models.vae.config.scaling_factor == pytest.approx(0.18215)


def test_metrics_have_every_term_and_the_loss_falls(run):
    history = run["history"]
    first = history[0]
    for key in ("loss", "mse", "dfc", "dfc_rgb_0", "dfc_rgb_2", "dfc_latent_0", "dfc_latent_mid", "grad_norm",
                "learning_rate", "is_finite"):
        assert key in first, key
    assert all(h["is_finite"] == 1.0 for h in history)
    assert first["learning_rate"] == pytest.approx(1e-3)
    assert first["loss"] == pytest.approx(first["mse"] + first["dfc"], rel=1e-6)
    # same batch, fresh draws each step: the DFC terms (no noise draw dependence on t) fall
    assert history[-1]["dfc"] < first["dfc"]
    assert len({round(h["mse"], 6) for h in history}) == STEPS  # draws differ per step (fold_in(step))


def test_non_finite_batch_leaves_the_state_unchanged(run):
    state, step = run["state"], run["step"]
    before = _host(state.params)
    bad = dict(run["batch"])
    bad["pixel_values"] = bad["pixel_values"].at[0, 0, 0, 0].set(jnp.nan)
    state, metrics = step(state, run["frozen"], bad)
    assert not bool(metrics["is_finite"])
    assert int(state.step) == STEPS + 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(b), a)
    run["state"] = state


def test_compile_report_and_memory_estimate(run):
    step = run["step"]
    assert step.compile_seconds > 0
    assert step.flops is None or step.flops > 1e6
    estimate = memory_estimate(run["state"], run["frozen"], batch_per_device=2, resolution=64)
    trainable = sum(x.size for x in jax.tree.leaves(run["initial_params"]))
    frozen = sum(x.size for x in jax.tree.leaves(run["initial_frozen"]))
    assert estimate["trainable_parameters"] == trainable and estimate["frozen_parameters"] == frozen
    assert estimate["params_bytes"] == 4 * trainable and estimate["frozen_bytes"] == 4 * frozen
    assert 2 * estimate["params_bytes"] <= estimate["opt_state_bytes"] <= 2 * estimate["params_bytes"] + 64


TINY_LEARNING_RATE = tiny_train_config().optimizer.learning_rate


def test_four_devices_data_and_fsdp_match_one_device(run, tmp_path):
    expected = dict(run["after_first"])
    expected["metric:loss"] = np.asarray(run["history"][0]["loss"])
    np.savez(tmp_path / "expected.npz", **expected)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "tests.helpers.training_multidevice", str(run["root"]),
                           str(tmp_path / "expected.npz")], env=env, capture_output=True, text=True, timeout=900,
                          cwd=TESTS.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    print(results)
    for label in ("data4", "fsdp2", "zero1"):
        assert results[label]["loss_rel_error"] < 1e-5, (label, results[label])
        # Adam divides by sqrt(v): float noise in near-zero gradients moves a parameter by up to
        # ~lr (1e-3 here) in either direction, so the tolerance is a fraction of the step size
        # (measured: 5.0e-5 on data=4); a sharding bug moves every parameter by O(lr).
        assert results[label]["params_max_abs_error"] < 0.1 * TINY_LEARNING_RATE, (label, results[label])
    assert results["fsdp2"]["sharded_params"] > 0 and results["fsdp2"]["sharded_frozen"] > 0
    assert results["fsdp2"]["resumed_from_other_layouts"] == 2
    assert results["zero1"]["optimizer_split"] * 2 == results["zero1"]["optimizer_whole"]  # each device: half


def test_optimizer_matches_torch_adamw_with_clipping():
    torch = pytest.importorskip("torch")
    config = tiny_train_config().optimizer
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    grads = [{k: 3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    tx = make_optimizer(config, total_steps=10)
    ours, opt_state = jax.tree.map(jnp.asarray, params), tx.init(params)
    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(list(torch_params.values()), lr=config.learning_rate, betas=(config.b1, config.b2),
                                  eps=config.eps, weight_decay=config.weight_decay)
    for g in grads:
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, ours)
        ours = optax.apply_updates(ours, updates)
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), config.grad_clip_norm)
        torch_opt.step()
    for k, p in torch_params.items():
        np.testing.assert_allclose(np.asarray(ours[k]), p.detach().numpy(), rtol=2e-6, atol=2e-7, err_msg=k)


def test_learning_rate_schedules_match_diffusers():
    torch = pytest.importorskip("torch")
    diffusers_optimization = pytest.importorskip("diffusers.optimization")
    config = tiny_train_config().optimizer
    config.warmup_steps = 3
    for name, diffusers_name in (("constant", "constant_with_warmup"), ("cosine", "cosine")):
        config.schedule = name
        ours = make_learning_rate_schedule(config, total_steps=12)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
        scheduler = diffusers_optimization.get_scheduler(diffusers_name, optimizer=opt, num_warmup_steps=3,
                                                         num_training_steps=12)
        for update in range(12):
            np.testing.assert_allclose(float(ours(update)), scheduler.get_last_lr()[0], rtol=1e-5, atol=1e-12,
                                       err_msg=f"{name} update {update}")
            opt.step()
            scheduler.step()
    config.gradient_accumulation_steps = 2
    assert isinstance(make_optimizer(config, 12), optax.MultiSteps)  # accumulation wraps the chain
    config.schedule = "linear"
    with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
        make_optimizer(config, 12)


def test_the_cpu_train_step_compiles_with_the_fast_compile_options(run):
    """On CPU the step compiles without YNNPACK fusions (CPU_FAST_COMPILE_OPTIONS): the options reach
    XLA, XLA's default would have them, and the config key turns the options off."""
    import ml_collections

    from xpsr_jax.configs import train as train_configs
    from xpsr_jax.training.config import ConfigError, validate_train_config
    from xpsr_jax.training.step import CPU_FAST_COMPILE_OPTIONS, compile_train_step, train_compiler_options

    config, mesh = run["config"], run["mesh"]
    assert train_compiler_options(config, mesh) == CPU_FAST_COMPILE_OPTIONS
    assert "__ynn_fusion" not in run["step"].compiled.as_text()
    lowered = jax.jit(lambda a, b: jax.nn.relu(a @ b)).lower(jnp.ones((64, 64)), jnp.ones((64, 64)))
    assert "__ynn_fusion" in compile_train_step(lowered).compiled.as_text()  # XLA:CPU's default
    assert "__ynn_fusion" not in compile_train_step(lowered, compiler_options=CPU_FAST_COMPILE_OPTIONS).compiled.as_text()
    off = config.copy_and_resolve_references()
    off.xla_cpu_fast_compile = False
    assert train_compiler_options(off, mesh) is None

    shipped = train_configs.get_config("tiny")
    shipped.base_model = shipped.pipeline.data_dir = shipped.pipeline.tokenizer_path = "unused"
    validate_train_config(shipped, check_paths=False)
    bad = ml_collections.ConfigDict({**shipped.to_dict(), "xla_cpu_fast_compile": "yes"})  # e.g. a config file's typo
    with pytest.raises(ConfigError, match="xla_cpu_fast_compile='yes' is invalid; valid: true or false"):
        validate_train_config(bad, check_paths=False)


def test_mesh_shapes_and_partition_rule():
    assert mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2)
    with pytest.raises(ValueError, match="mesh.fsdp=3"):
        mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="mesh.data=3"):
        mesh_shape({"data": 3, "fsdp": 2}, 8)
    assert make_mesh({"data": -1, "fsdp": 1}).axis_names == ("data", "fsdp")
    P = jax.sharding.PartitionSpec
    assert fsdp_partition_spec((3, 3, 320, 640), 2) == P(None, None, None, "fsdp")
    assert fsdp_partition_spec((320,), 2) == P()  # small: replicated
    assert fsdp_partition_spec((4097, 3), 2) == P()  # no divisible dimension
    assert fsdp_partition_spec((3, 3, 320, 640), 1) == P()


def test_checkpoints_may_live_outside_the_workdir_or_in_a_bucket(tmp_path):
    """`checkpoint_dir` moves the checkpoints out of the workdir (a local stand-in for gs://): the
    loop's readers and the export find them there; a bucket URL is never turned into a local path."""
    import json as json_module

    import jax.numpy as jnp

    from xpsr_jax.export.torch_layout import resolve_checkpoint
    from xpsr_jax.training.checkpoint import (
        TrainCheckpoints,
        checkpoint_directory,
        finalized_steps,
        read_checkpoint_meta,
        storage_path,
    )

    bucket = checkpoint_directory(tmp_path / "run", "gs://bucket/xpsr/ckpt")
    assert str(bucket) == "gs://bucket/xpsr/ckpt" and str(bucket / "7") == "gs://bucket/xpsr/ckpt/7"
    assert str(checkpoint_directory(tmp_path / "run")) == str(tmp_path / "run" / "checkpoints")
    assert not (tmp_path / "run").exists() and str(storage_path("gs://b/c")) == "gs://b/c"

    elsewhere = tmp_path / "elsewhere"
    checkpoints = TrainCheckpoints(checkpoint_directory(tmp_path / "run", str(elsewhere)), keep=2, async_save=False)
    checkpoints.save(3, {"w": jnp.arange(4.0)}, {"step": 3, "config": {}, "frozen_base": {}})
    checkpoints.close()
    assert finalized_steps(elsewhere) == [3] and read_checkpoint_meta(elsewhere, 3)["step"] == 3
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json_module.dumps({"checkpoint_dir": str(elsewhere)}))
    assert str(resolve_checkpoint(tmp_path / "run")) == str(elsewhere / "3")
