"""The packaged train config (`xpsr_jax/configs/train.py`), here so `--config configs/train.py` keeps working
from the repository root. Edit or copy the packaged file; `--config train.py` finds it from anywhere."""

from xpsr_jax.configs.train import VARIANTS, get_config  # noqa: F401
