"""The packaged infer config (`xpsr_jax/configs/infer.py`), here so `--config configs/infer.py` keeps working
from the repository root. Edit or copy the packaged file; `--config infer.py` finds it from anywhere."""

from xpsr_jax.configs.infer import VARIANTS, get_config  # noqa: F401
