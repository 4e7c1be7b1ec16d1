"""XPSR super-resolution of an image or a folder: `python infer.py --help` (xpsr_jax.inference.cli)."""

import sys

from xpsr_jax.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
