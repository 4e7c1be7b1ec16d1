"""``python -m xpsr_jax.evaluate``: see `xpsr_jax.evaluation.cli` (``--help``)."""

import sys

from xpsr_jax.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
