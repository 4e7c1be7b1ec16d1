"""Training-data config: `prepare` (crop / caption / build), `degradation`, `pipeline`.

Commands::

    python -m xpsr_jax.data.prepare --config configs/data.py --hr-dir HR --work-dir work \
        --data-dir tfds --highlevel-model /models/llava-1.5-7b-hf --lowlevel-model /models/qinstruct
    python -m xpsr_jax.data.prepare --config data.py:tiny --hr-dir HR ...

Variants (`:a,b`): `tiny` (formerly `runlocal`, still accepted) shrinks crops, batches and threads
for a laptop run;
`released_prompts` feeds the empty high-level prompt as the released training script does
(the default is the paper's HR caption). Command-line flags override file values.
`prepare.hr_target` (`--hr-target`) is the HR image stored: `usm` (default: the crop sharpened
with `degradation.usm.*`, as the official make_train.py saves its GT) or `original` (the crop);
the dataset records it (`xpsr_jax.data.tfds_builder.read_hr_target`).
The training side reads `config.pipeline` (see xpsr_jax.data.pipeline).
"""

from ml_collections import config_dict

from xpsr_jax.data.degradation import default_degradation_config
from xpsr_jax.data.pipeline import default_pipeline_config
from xpsr_jax.data.prepare import default_prepare_config

VARIANTS = ("tiny", "released_prompts")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    """get_config("variant,...") -> locked ConfigDict with prepare / degradation / pipeline."""
    variants = [v for v in (arg or "").split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"data.py: unknown variant(s) {unknown}; valid: {VARIANTS}")

    config = config_dict.ConfigDict()
    config.prepare = default_prepare_config()
    config.degradation = default_degradation_config()
    config.pipeline = default_pipeline_config()

    if "tiny" in variants:
        config.prepare.crop_size = 128
        config.prepare.caption_batch_size = 1
        config.pipeline.resolution = 128
        config.pipeline.batch_size = 1
        config.pipeline.num_threads = 2
        config.pipeline.prefetch_buffer_size = 4
    if "released_prompts" in variants:
        config.pipeline.highlevel_prompt_source = "empty"
    config.lock()
    return config
