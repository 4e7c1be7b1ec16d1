"""Inference config: the official XPSR test recipe by default.

Commands::

    python -m xpsr_jax.infer --weights RELEASE --sd15 SD15 --input LR_DIR --output OUT
    python -m xpsr_jax.infer ... --config infer.py:validation          # the training-time validation recipe
    python -m xpsr_jax.infer ... --config infer.py:tiny --config.num_inference_steps=2

Variants (`:a,b`):
  - (none)      the official test script: DDPM, 20 steps, added noise 800, guidance 4.5, 512 px, AdaIN
  - `validation` the official training script's validation path: UniPC, added noise 400
  - `tiny`      small process size and few steps, for a CPU and the tiny model
  - `one_step`  one-step XPSR weights (docs/one_step.md): one unguided pass at t=999, no sampler,
                the high-level prompt as trained (no added prompt)
Command-line flags (`--config.KEY=VALUE`) override file values; the config is locked, so a
mistyped key is an error. `xpsr_jax.inference.config.validate_infer_config` checks every value.
"""

from xpsr_jax.inference.config import default_infer_config

VARIANTS = ("validation", "tiny", "one_step")


def get_config(arg: str | None = None):
    """get_config("variant,...") -> locked ConfigDict of the inference recipe."""
    variants = [v for v in (arg or "").split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"infer.py: unknown variant(s) {unknown}; valid: {VARIANTS}")
    config = default_infer_config()
    if "validation" in variants:
        config.sampler = "unipc"
        config.added_noise_level = 400
    if "one_step" in variants:
        config.init = "one_step"
        config.guidance_scale = 1.0
        config.num_inference_steps = 1  # for the record: the sampler does not run
        config.added_prompt = ""
    if "tiny" in variants:
        config.process_size = 64
        config.num_inference_steps = 1 if "one_step" in variants else 4
        config.batch_size = 2
        config.tiling.latent_tile_size = 16
        config.tiling.latent_tile_overlap = 4
        config.tiling.vae_encoder_tile_size = 128
        config.tiling.vae_decoder_tile_size = 16
    return config
