"""Checkpoint I/O: PyTorch on-disk formats (safetensors / .bin) <-> Flax NNX modules."""

from xpsr_jax.weights.convert import (
    WeightLoadError,
    load_state_dict_into,
    module_state_dict,
)
from xpsr_jax.weights.files import (
    read_state_dict,
    resolve_weights_file,
    write_state_dict,
)
from xpsr_jax.weights.pretrained import PretrainedMixin

__all__ = [
    "PretrainedMixin",
    "WeightLoadError",
    "load_state_dict_into",
    "module_state_dict",
    "read_state_dict",
    "resolve_weights_file",
    "write_state_dict",
]
