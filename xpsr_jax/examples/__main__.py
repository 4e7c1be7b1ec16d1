"""`python -m xpsr_jax.examples --out DIR`: the packaged sample images as a small official-layout
test set (HR/, LR/ at 32 px, prompt folders), for trying infer and evaluate on a CPU."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from xpsr_jax.cli_config import CommandParser, report_error
from xpsr_jax.examples import write_test_set


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m xpsr_jax.examples", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (created; existing files replaced)")
    args = parser.parse_args(argv)
    try:
        out = write_test_set(args.out)
    except OSError as error:
        report_error(error)
        return 2
    print(f"wrote {out}: HR/, LR/ (x1/4), highlevel_prompt/, lowlevel_prompt_q/, captions.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
