"""xpsr-jax: JAX/Flax implementation of XPSR (ECCV 2024)."""

__version__ = "0.1.0"
