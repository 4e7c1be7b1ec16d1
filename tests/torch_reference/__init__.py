"""PyTorch reference of the XPSR UNet and ControlNet; see xpsr_torch.py for the API."""

from .xpsr_torch import *  # noqa: F401,F403
from .xpsr_torch import __all__  # noqa: F401
