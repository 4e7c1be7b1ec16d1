"""`python -m xpsr_jax.study`: see xpsr_jax.study.cli."""

import sys

from xpsr_jax.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
