"""Run by tests/test_export.py in a subprocess with 4 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.helpers.export_multidevice \
        CHECKPOINT_1DEV RELEASE OUT_4DEV

1. Restores CHECKPOINT_1DEV (an inference checkpoint written on 1 device) onto a data=1 x
   fsdp=4 mesh with the fsdp sharding rule, checks every parameter's sharding and that the values
   equal the RELEASE's safetensors bit for bit.
2. Writes OUT_4DEV from those 4-device sharded networks (the parent restores it on 1 device).
Prints one JSON line "RESULT {...}".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from xpsr_jax.export.inference_checkpoint import save_inference_checkpoint  # noqa: E402
from xpsr_jax.models.loading import load_inference_checkpoint  # noqa: E402
from xpsr_jax.training.sharding import fsdp_partition_spec, tree_shardings  # noqa: E402
from xpsr_jax.weights.convert import module_state_dict  # noqa: E402
from xpsr_jax.weights.files import read_state_dict  # noqa: E402


def main() -> None:
    checkpoint, release, out = (Path(p) for p in sys.argv[1:4])
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()).reshape(1, 4), ("data", "fsdp"))
    networks = load_inference_checkpoint(
        checkpoint, sharding=lambda name, params: tree_shardings(params, mesh, shard=True))
    counts = {"sharded": 0, "replicated": 0, "leaves": 0}
    for name, network in zip(("unet", "controlnet"), networks):
        for path, variable in nnx.to_flat_state(nnx.state(network, nnx.Param)):
            array = variable.get_value()
            want = fsdp_partition_spec(array.shape, 4)
            assert array.sharding.mesh.devices.size == 4, (path, array.sharding)
            assert array.sharding.spec == want, (path, array.sharding.spec, want)
            counts["sharded" if want != P() else "replicated"] += 1
            counts["leaves"] += 1
        # The values, gathered from the 4 devices, are the release's bytes.
        ours = module_state_dict(network)
        theirs = read_state_dict(release / name / "diffusion_pytorch_model.safetensors")
        assert sorted(ours) == sorted(theirs), name
        for key, value in ours.items():
            assert value.dtype == theirs[key].dtype and value.tobytes() == theirs[key].tobytes(), (name, key)
    assert counts["sharded"] > 0 and counts["replicated"] > 0, counts

    configs = {name: (checkpoint / name / "config.json").read_bytes() for name in ("unet", "controlnet")}
    save_inference_checkpoint(out, *networks, configs=configs, manifest={"source": str(checkpoint), "step": None,
                                                                         "dtype": "float32"})
    print("RESULT " + json.dumps(counts))


if __name__ == "__main__":
    main()
