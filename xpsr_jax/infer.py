"""`python -m xpsr_jax.infer`: see xpsr_jax.inference.cli."""

import sys

from xpsr_jax.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
