"""Run by tests/test_training_step.py in a subprocess with 4 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.helpers.training_multidevice ROOT EXPECTED.npz

ROOT holds the tiny models (tests/training_fixtures.py), EXPECTED.npz the 1-device loss and
updated params after one step. One step on mesh data=4, and on data=2 x fsdp=2 with trainable
and frozen weights sharded, must reproduce them; the partition specs are checked. Prints a JSON
line with the results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)

import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from tests.helpers.training_fixtures import SFA_EVERYWHERE, fixed_batch, tiny_train_config  # noqa: E402
from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config  # noqa: E402
from xpsr_jax.training import create_train_state, global_batch, load_training_models, make_mesh, make_train_step  # noqa: E402
from xpsr_jax.training.sharding import fsdp_partition_spec  # noqa: E402


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main() -> None:
    root, expected_path = Path(sys.argv[1]), sys.argv[2]
    expected = dict(np.load(expected_path))
    assert jax.device_count() == 4, jax.devices()
    schedule = noise_schedule_from_config(load_scheduler_config(root / "sd15" / "scheduler"))
    results = {}
    for label, mesh_overrides in (("data4", dict(data=-1, fsdp=1)),
                                  ("fsdp2", dict(data=2, fsdp=2, shard_trainable=True, shard_frozen=True))):
        config = tiny_train_config(**mesh_overrides)
        models = load_training_models(str(root / "sd15"), str(root / "release"), SFA_EVERYWHERE,
                                      attention_backend="xla")
        mesh = make_mesh(config.mesh)
        state, frozen, graphdefs = create_train_state(models, config, mesh)
        specs = {"sharded_params": 0, "replicated_params": 0}
        if label == "fsdp2":
            mu = state.opt_state[1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
            for (path, leaf), mu_leaf in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(mu)):
                want = fsdp_partition_spec(leaf.shape, 2)
                assert leaf.sharding.spec == want, (jax.tree_util.keystr(path), leaf.sharding.spec, want)
                assert mu_leaf.sharding.spec == want, (jax.tree_util.keystr(path), mu_leaf.sharding.spec)
                specs["sharded_params" if want != P() else "replicated_params"] += 1
            frozen_sharded = sum(leaf.sharding.spec != P() for leaf in jax.tree.leaves(frozen))
            assert frozen_sharded > 0
            specs["sharded_frozen"] = int(frozen_sharded)
            assert specs["sharded_params"] > 0 and specs["replicated_params"] > 0
        batch = global_batch(fixed_batch(4), mesh)
        assert batch["pixel_values"].sharding.spec == P(("data", "fsdp"))
        step = make_train_step(config, graphdefs, schedule, mesh, state, frozen, batch)
        state, metrics = step(state, frozen, batch)
        params = flat(state.params)
        assert set(params) == {k for k in expected if not k.startswith("metric:")}
        worst = max(float(np.max(np.abs(params[k] - expected[k]))) for k in params)
        loss_error = abs(float(metrics["loss"]) - float(expected["metric:loss"])) / float(expected["metric:loss"])
        results[label] = dict(loss=float(metrics["loss"]), loss_rel_error=loss_error, params_max_abs_error=worst,
                              compile_seconds=step.compile_seconds, **specs)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
