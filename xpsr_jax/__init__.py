"""xpsr-jax: JAX/Flax implementation of XPSR (ECCV 2024)."""

from xpsr_jax.platforms import quiet_libtpu_without_tpu

__version__ = "0.1.0"

quiet_libtpu_without_tpu()  # before any JAX backend starts: no libtpu noise on machines without a TPU
