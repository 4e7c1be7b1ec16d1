"""xpsr-jax: JAX/Flax implementation of XPSR (ECCV 2024)."""

from xpsr_jax.platforms import quiet_libtpu_without_tpu, quiet_transformers_without_torch

__version__ = "0.1.0"

quiet_libtpu_without_tpu()  # before any JAX backend starts: no libtpu noise on machines without a TPU
quiet_transformers_without_torch()  # before transformers is imported: no "PyTorch was not found" line
