"""Studies of the paper run as commands: `python -m xpsr_jax.experiments.mllm_ablation` (supplement
Table 3, the effect of the MLLM's captions)."""
