"""XPSR training: python train.py --config configs/train.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

See xpsr_jax/train.py (the same as `python -m xpsr_jax.train`) and configs/train.py.
"""

import sys

from xpsr_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
