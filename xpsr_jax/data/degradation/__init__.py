"""Real-ESRGAN second-order degradation (numpy + OpenCV) for XPSR training pairs.

Turns an HR crop into its LR counterpart the way Real-ESRGAN synthesises
training data (`realesrgan/models/realesrnet_model.py::feed_data`, kernels from
`realesrgan/data/realesrgan_dataset.py`, ops from BasicSR), with the values of
`options/train_realesrnet_x4plus.yml` and the XPSR data script
(`utils_data/make_train.py`, second blur probability 0.8):

  USM-sharpen GT
  stage 1: blur -> random resize -> Gaussian|Poisson noise -> JPEG
  stage 2: blur (p=0.8) -> random resize -> Gaussian|Poisson noise
  final:   [resize to HR/scale + sinc, JPEG] or [JPEG, resize + sinc] (p=0.5 each)
  clamp, round to 1/255 -> uint8

The randomness is drawn in two steps so every choice can be stored with the
example: `sample_degradation_plan` draws all discrete and scalar choices (a
`DegradationPlan`), `apply_degradation_plan` runs the ops, drawing only the
noise fields. `degrade(hr, config, seed=, example_id=)` does both from
`SeedSequence([seed, example_id])`, so an example is reproducible bit for bit.
XPSR then upsamples the LR bicubically back to HR size; that is not done here.

Known, documented deviations from the PyTorch reference (all sub-pixel or
codec-level): JPEG is libjpeg via cv2 at an integer quality instead of
BasicSR's DiffJPEG at a float quality; stage-1 resize maps coordinates with the
output/input size ratio, torch with the drawn scale factor (they differ by
under one output pixel across the image). 'area' resizing reproduces torch's
adaptive average pooling exactly; bilinear and bicubic match torch
(align_corners=False, A=-0.75) to float rounding.

Public API:
  default_degradation_config() -> ConfigDict
  validate_degradation_config(cfg) -> None (raises ValueError naming the key)
  degrade(hr, config, *, seed, example_id) -> (lr uint8, params dict)
  DEGRADATION_PARAM_KEYS, KERNEL_FAMILIES, RESIZE_MODES, RESIZE_DIRECTIONS, NOISE_TYPES
  sample_degradation_plan(config, rng) -> DegradationPlan
  apply_degradation_plan(image, plan, config, rng) -> float32 LR in [0, 1]
  degradation_params(plan) -> flat dict keyed by DEGRADATION_PARAM_KEYS
  ops: usm_sharpen, blur, resize, add_gaussian_noise, add_poisson_noise, jpeg_compress
  samplers: sample_blur_kernel, sample_final_sinc, sample_resize, sample_noise,
            sample_jpeg_quality

Modules: `config` (defaults, validation), `ops` (pure image ops), `plan` (drawing the choices),
`params` (the flat record), `apply` (running a plan; `degrade`), `__main__` (the command).

CLI:
  python -m xpsr_jax.data.degradation --image hr.png --out lr.png --seed 0 --example-id 3
  python -m benchmarks.degradation_speed --crops 50 --size 512 --threads 1      # crops/s
"""


from xpsr_jax.data.degradation.apply import apply_degradation_plan, degrade
from xpsr_jax.data.degradation.config import (
                                              NOISE_TYPES,
                                              RESIZE_DIRECTIONS,
                                              RESIZE_MODES,
                                              default_degradation_config,
                                              validate_degradation_config,
)
from xpsr_jax.data.degradation.ops import (
                                              add_gaussian_noise,
                                              add_poisson_noise,
                                              blur,
                                              jpeg_compress,
                                              resize,
                                              to_uint8,
                                              usm_sharpen,
)
from xpsr_jax.data.degradation.params import DEGRADATION_PARAM_KEYS, degradation_params
from xpsr_jax.data.degradation.plan import (
                                              DegradationPlan,
                                              FinalPlan,
                                              StagePlan,
                                              sample_blur_kernel,
                                              sample_degradation_plan,
                                              sample_final_sinc,
                                              sample_jpeg_quality,
                                              sample_noise,
                                              sample_resize,
)
from xpsr_jax.data.kernels import KERNEL_FAMILIES

__all__ = [
    "DEGRADATION_PARAM_KEYS", "KERNEL_FAMILIES", "NOISE_TYPES", "RESIZE_DIRECTIONS", "RESIZE_MODES",
    "DegradationPlan", "FinalPlan", "StagePlan", "add_gaussian_noise", "add_poisson_noise",
    "apply_degradation_plan", "blur", "default_degradation_config", "degradation_params", "degrade",
    "jpeg_compress", "resize", "sample_blur_kernel", "sample_degradation_plan", "sample_final_sinc",
    "sample_jpeg_quality", "sample_noise", "sample_resize", "to_uint8", "usm_sharpen",
    "validate_degradation_config",
]
