"""`python -m xpsr_jax.demo`: see xpsr_jax.demo.cli."""

import sys

from xpsr_jax.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
