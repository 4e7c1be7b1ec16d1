"""The packaged data config (`xpsr_jax/configs/data.py`), here so `--config configs/data.py` keeps working
from the repository root. Edit or copy the packaged file; `--config data.py` finds it from anywhere."""

from xpsr_jax.configs.data import VARIANTS, get_config  # noqa: F401
