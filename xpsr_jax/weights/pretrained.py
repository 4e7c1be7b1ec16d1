"""`from_pretrained` / `save_pretrained` for models stored in the diffusers / transformers layout."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib

from xpsr_jax.weights.convert import check_state_dict_fits, load_state_dict_into, module_state_dict
from xpsr_jax.weights.files import (
    read_state_dict,
    resolve_weights_file,
    write_state_dict,
)


@contextlib.contextmanager
def untracked_rng_counts():
    """Inside `nnx.eval_shape`, let RNG streams draw keys without updating their traced counters.

    Under tracing every `rngs.params()` writes a tracer into the stream's counter, and flax's
    `Variable.set_value` then reads `tracer.sharding`, whose error message walks the whole jaxpr:
    quadratic in the number of layers (measured: 103 s to build the tiny XPSR UNet abstractly on
    a loaded 2-core machine). Abstract builds only need shapes, so fresh keys from a Python
    counter do. Not thread-safe: only for abstract model construction.
    """
    original = rnglib.RngStream.__call__
    counter = itertools.count()

    def draw(self):
        return jax.random.fold_in(self.key[...], next(counter))

    rnglib.RngStream.__call__ = draw
    try:
        yield
    finally:
        rnglib.RngStream.__call__ = original


def eval_shape_model(build):
    """`nnx.eval_shape(build)` with untracked RNG counts (see `untracked_rng_counts`)."""
    with untracked_rng_counts():
        return nnx.eval_shape(build)


class PretrainedMixin:
    """Adds checkpoint I/O to an NNX model built as `cls(config, *, rngs, dtype, param_dtype, ...)`.

    Subclasses set `config_class` (a `ModelConfig`), `weights_stem` ("diffusion_pytorch_model"
    for diffusers, "model" for transformers), and optionally `state_dict_ignore` (regexes of
    known non-parameter buffers) and `rename_legacy_key`.
    """

    config_class: ClassVar[type]
    weights_stem: ClassVar[str] = "diffusion_pytorch_model"
    state_dict_ignore: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def rename_legacy_key(key: str) -> str:
        return key

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        subfolder: str | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        **model_kwargs: Any,
    ):
        """Load `folder[/subfolder]/config.json` + weights, strictly (see `load_state_dict_into`).

        `dtype` is the compute dtype, `param_dtype` the dtype parameters are stored in;
        `model_kwargs` go to the constructor (e.g. `attention_backend="chunked"`).
        The model is built abstractly first, so no random initialisation is computed.
        """
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        config = cls.config_class.from_json_file(folder / "config.json")
        weights_path = resolve_weights_file(folder, cls.weights_stem)
        state_dict = read_state_dict(weights_path)
        abstract = eval_shape_model(
            lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **model_kwargs)
        )
        return load_state_dict_into(
            abstract,
            state_dict,
            source=str(weights_path),
            ignore=cls.state_dict_ignore,
            rename=cls.rename_legacy_key,
            dtype=param_dtype,
        )

    @classmethod
    def check_state_dict(cls, config, state_dict: dict, *, source: str) -> None:
        """WeightLoadError naming `source` when `state_dict` would not load into the model of
        `config` (missing, unexpected or mis-shaped tensors); nothing is computed or loaded."""
        abstract = eval_shape_model(lambda: cls(config, rngs=nnx.Rngs(0)))
        check_state_dict_fits(abstract, state_dict, source=source, ignore=cls.state_dict_ignore,
                              rename=cls.rename_legacy_key)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` and `{weights_stem}.safetensors` (PyTorch layout) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_state_dict(folder / f"{self.weights_stem}.safetensors", module_state_dict(self))
        config_path = folder / "config.json"
        tmp = config_path.with_name("config.json.tmp")
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_path)
        return folder
