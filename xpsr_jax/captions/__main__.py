"""``python -m xpsr_jax.captions --help``."""

import sys

from xpsr_jax.captions.cli import main

if __name__ == "__main__":
    sys.exit(main())
