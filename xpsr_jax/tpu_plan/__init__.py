"""Pod runs planned on this machine: our programs compiled for a TPU topology by XLA:TPU (libtpu,
the [tpu] extra), with per-chip memory, FLOPs, collectives and a step-time lower bound.
`python -m xpsr_jax.tpu_plan --help`."""
