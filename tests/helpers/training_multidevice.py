"""Run by tests/test_training_step.py in a subprocess with 4 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.helpers.training_multidevice ROOT EXPECTED.npz

ROOT holds the tiny models (tests/training_fixtures.py), EXPECTED.npz the 1-device loss and
updated params after one step. One step on mesh data=4, and on data=2 x fsdp=2 with trainable
and frozen weights sharded, must reproduce them; the partition specs are checked (per parameter
and per group in the flat optimizer state, whose flattening must need no collective), and a
checkpoint's optimizer state in another layout must convert to this run's exactly. Prints a JSON line with the results.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)

import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from tests.helpers.training_fixtures import SFA_EVERYWHERE, fixed_batch, tiny_train_config  # noqa: E402
from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config  # noqa: E402
from xpsr_jax.training import (  # noqa: E402
    create_train_state,
    global_batch,
    load_training_models,
    make_mesh,
    make_train_step,
)
from xpsr_jax.training.flat import FlatLayout  # noqa: E402
from xpsr_jax.training.sharding import fsdp_partition_spec  # noqa: E402
from xpsr_jax.training.step import checkpoint_restore_target, flat_layout  # noqa: E402


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_resume_from_other_layouts(state, mesh, config) -> int:
    """A checkpoint's optimizer state written without fsdp (flat, one group) or before the flat
    layout (per parameter) comes back as exactly this run's state, sharded as this run's."""
    layout = flat_layout(state.params, mesh, config)
    per_parameter = jax.jit(layout.to_per_parameter)(state.opt_state)
    plain = FlatLayout.for_params(state.params)
    checked = 0
    for saved_layout, saved_opt_state in ((plain.record(), jax.jit(plain.from_per_parameter)(per_parameter)),
                                          (None, per_parameter)):
        target, convert = checkpoint_restore_target(state, mesh, config, saved_layout)
        assert convert is not None
        saved = state.replace(opt_state=saved_opt_state)
        # As orbax restores it: fresh arrays (the conversion donates them) in the target's shardings.
        restored = convert(jax.tree.map(lambda x, t: jax.device_put(np.asarray(x), t.sharding), saved, target))
        for got, want in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            assert got.sharding.spec == want.sharding.spec
        checked += 1
    assert checkpoint_restore_target(state, mesh, config, layout.record())[1] is None  # same layout: as it is
    return checked


def main() -> None:
    root, expected_path = Path(sys.argv[1]), sys.argv[2]
    expected = dict(np.load(expected_path))
    assert jax.device_count() == 4, jax.devices()
    schedule = noise_schedule_from_config(load_scheduler_config(root / "sd15" / "scheduler"))
    results = {}
    for label, mesh_overrides in (("data4", dict(data=-1, fsdp=1)),
                                  ("fsdp2", dict(data=2, fsdp=2, shard_trainable=True, shard_frozen=True)),
                                  ("zero1", dict(data=2, fsdp=2, shard_optimizer=True))):
        config = tiny_train_config(**mesh_overrides)
        models = load_training_models(str(root / "sd15"), str(root / "release"), SFA_EVERYWHERE,
                                      attention_backend="xla")
        mesh = make_mesh(config.mesh)
        state, frozen, graphdefs = create_train_state(models, config, mesh)
        specs = {"sharded_params": 0, "replicated_params": 0}
        if label == "fsdp2":
            layout = flat_layout(state.params, mesh, config)
            flat_mu = state.opt_state[1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
            assert set(flat_mu) == {"float32", "float32/fsdp"}, set(flat_mu)
            for group, buffer in flat_mu.items():
                assert buffer.sharding.spec == (P("fsdp", None) if group.endswith("/fsdp") else P()), group
            # Flattening keeps every element on the device that holds it: no collective at all.
            flatten = jax.jit(layout.flatten, out_shardings=layout.shardings(mesh))
            hlo = flatten.lower(state.params).compile().as_text()
            collectives = re.findall(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", hlo)
            assert not collectives, collectives[:5]
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
                want = fsdp_partition_spec(leaf.shape, 2)
                assert leaf.sharding.spec == want, (jax.tree_util.keystr(path), leaf.sharding.spec, want)
                specs["sharded_params" if want != P() else "replicated_params"] += 1
            frozen_sharded = sum(leaf.sharding.spec != P() for leaf in jax.tree.leaves(frozen))
            assert frozen_sharded > 0
            specs["sharded_frozen"] = int(frozen_sharded)
            assert specs["sharded_params"] > 0 and specs["replicated_params"] > 0
        if label == "zero1":  # params whole on every device, the optimizer's flat buffers split over fsdp
            flat_mu = state.opt_state[1][0].mu
            assert set(flat_mu) == {"float32"} and flat_mu["float32"].sharding.spec == P("fsdp"), flat_mu
            assert all(leaf.sharding.spec == P() for leaf in jax.tree.leaves(state.params))
            specs["optimizer_split"] = int(flat_mu["float32"].addressable_shards[0].data.size)
            specs["optimizer_whole"] = int(flat_mu["float32"].size)
        batch = global_batch(fixed_batch(4), mesh)
        assert batch["pixel_values"].sharding.spec == P(("data", "fsdp"))
        step = make_train_step(config, graphdefs, schedule, mesh, state, frozen, batch)
        state, metrics = step(state, frozen, batch)
        if label == "fsdp2":
            specs["resumed_from_other_layouts"] = check_resume_from_other_layouts(state, mesh, config)
        params = flat(state.params)
        assert set(params) == {k for k in expected if not k.startswith("metric:")}
        worst = max(float(np.max(np.abs(params[k] - expected[k]))) for k in params)
        loss_error = abs(float(metrics["loss"]) - float(expected["metric:loss"])) / float(expected["metric:loss"])
        results[label] = dict(loss=float(metrics["loss"]), loss_rel_error=loss_error, params_max_abs_error=worst,
                              compile_seconds=step.compile_seconds, **specs)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
