"""Jitted XPSR inference: preprocessing, the sampling function, tiling, colour fix, the pipeline."""

from xpsr_jax.inference.color_fix import adain_color_fix, wavelet_color_fix
from xpsr_jax.inference.config import default_infer_config, validate_infer_config
from xpsr_jax.inference.pipeline import WeightsFolderError, XPSRPipeline
from xpsr_jax.inference.preprocess import InputImageError, preprocess_lr, resize_output
from xpsr_jax.inference.sampling import PromptEmbeds, SampleOutput, SamplingNoise

__all__ = [
    "InputImageError",
    "PromptEmbeds",
    "SampleOutput",
    "SamplingNoise",
    "WeightsFolderError",
    "XPSRPipeline",
    "adain_color_fix",
    "default_infer_config",
    "preprocess_lr",
    "resize_output",
    "validate_infer_config",
    "wavelet_color_fix",
]
