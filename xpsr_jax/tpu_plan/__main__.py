import sys

from xpsr_jax.tpu_plan.cli import main

sys.exit(main())
