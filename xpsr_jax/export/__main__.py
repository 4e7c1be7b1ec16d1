import sys

from xpsr_jax.export.cli import main

sys.exit(main())
