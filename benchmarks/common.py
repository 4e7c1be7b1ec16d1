"""What every benchmark script shares: timing helpers, result records and the one markdown table
of the GPU check, and the model size presets.

Run the scripts as modules from the repository root, e.g. `python -m benchmarks.train_speed`.

Size presets (`SIZES`): "sd15" is Stable Diffusion 1.5; "tiny" is the tiny random model of
`xpsr_jax.models.tiny` (its UNet, VAE and CLIP widths) with one layer per UNet block; "micro" is
tiny with two UNet levels (every block type and code path at half the compile: the GPU check's
`--dry-run`).

Records: each script given `--json FILE` appends one record per measurement:

    {"row": "train 512 px, batch 1, remat none", "match": "train 512 px, batch 1", "impl": "xpsr-jax",
     "value": 12.3, "unit": "images/s", "details": "peak 20.1 GiB, MFU 35.2%"}

`impl` is "xpsr-jax", "pytorch" (eager) or "pytorch-compile"; a PyTorch record is compared with
every xpsr-jax row of the same `match` (the PyTorch side has no remat variants). A record with
"error" instead of "value" is a row that failed (gpu_check.sh writes those for a command that
crashed or ran out of time) and shows as `error: ...` in the table.

    python -m benchmarks.common table RESULTS.jsonl                  # prints the markdown table
    python -m benchmarks.common parity PYTEST_LOG RESULTS.jsonl ROW  # the parity test's record
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import sys
import time

import numpy as np

from xpsr_jax.models import XPSRUNetConfig
from xpsr_jax.models import tiny as tiny_model
from xpsr_jax.models.tiny_tokenizer import tiny_clip_vocab

# ----------------------------------------------------------------------------- size presets


def _unet_keys(config: dict) -> dict:
    fields = {f.name for f in dataclasses.fields(XPSRUNetConfig)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}


TINY_UNET = dict(_unet_keys(tiny_model.UNET_CONFIG), layers_per_block=1)
MICRO_UNET = dict(TINY_UNET, block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), up_use_lowlevel_prompt=(False, False))
TINY_VAE = {k: tuple(v) if isinstance(v, list) else v for k, v in tiny_model.VAE_CONFIG.items()
            if k in ("block_out_channels", "norm_num_groups", "layers_per_block")}
TINY_CLIP = dict(vocab_size=len(tiny_clip_vocab()), **{k: tiny_model.TEXT_ENCODER_CONFIG[k] for k in (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")})
# size -> (UNet config keys, VAE config keys, CLIP config keys); {}: SD 1.5's own.
SIZES = {"micro": (MICRO_UNET, TINY_VAE, TINY_CLIP), "tiny": (TINY_UNET, TINY_VAE, TINY_CLIP), "sd15": ({}, {}, {})}

# ----------------------------------------------------------------------------- timing

def median_ms(fn, repeats: int) -> float:
    """Median wall milliseconds of `fn()` over `repeats` calls; the caller warms up / compiles first."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def torch_median_ms(fn, repeats: int) -> float:
    """`median_ms` for a PyTorch call: no autograd, one warm-up call, and a CUDA sync per call."""
    import torch

    def run():
        with torch.no_grad():
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    run()
    return median_ms(run, repeats)


class RowTimeout(Exception):
    """Raised inside `time_limit` when its seconds run out."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise RowTimeout in the main thread after `seconds` (None: no limit), so one slow row
    (a torch.compile that does not finish) is reported instead of stalling the whole table."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise RowTimeout(f"did not finish in {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def torch_compiled(module, backend: str | None):
    """`torch.compile(module, backend=backend)`, or the module itself when backend is None."""
    if backend is None:
        return module
    import torch

    return torch.compile(module, backend=backend)


# ----------------------------------------------------------------------------- records

IMPLS = ("xpsr-jax", "pytorch", "pytorch-compile")
HEADER = ("| benchmark | xpsr-jax | PyTorch reference (eager) | ours / PyTorch | PyTorch torch.compile "
          "| ours / torch.compile |\n|---|---|---|---:|---|---:|")


def append_record(path: str | None, **record) -> None:
    """Append one record to `path` (no-op when path is None)."""
    if path is None:
        return
    if "error" not in record and record.get("impl") not in IMPLS:
        raise ValueError(f"record impl {record.get('impl')!r} is not one of {IMPLS}")
    record.setdefault("match", record.get("row"))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def seconds_per_unit(record: dict) -> float:
    """Time per image (or per step): the ratio column compares times whatever the unit."""
    value = float(record["value"])
    return 1.0 / value if record["unit"].endswith("/s") else value


def _cell(record: dict | None) -> str:
    if record is None:
        return "not run"
    if "error" in record:
        return f"error: {record['error']}"
    if "value" not in record or record["value"] is None:
        return str(record.get("details", "n/a")).replace("|", "/")
    details = f" ({record['details']})" if record.get("details") else ""
    return f"{record['value']:.4g} {record['unit']}{details}".replace("|", "/")


def _ratio(ours: dict, theirs: dict | None) -> str:
    if theirs is None or theirs.get("value") is None or ours.get("value") is None:
        return "n/a"
    return f"{seconds_per_unit(ours) / seconds_per_unit(theirs):.2f}"


def markdown_table(records: list[dict]) -> str:
    """One line per xpsr-jax row (and per error); ratio = our time / PyTorch time (< 1: ours faster)."""
    by_match = {}
    for record in records:
        if "error" not in record and record["impl"] != "xpsr-jax":
            by_match[(record["match"], record["impl"])] = record
    lines = [HEADER]
    for record in records:
        if "error" in record:
            lines.append(f"| {record['row']} | error: {record['error']} | | | | |")
        elif record["impl"] == "xpsr-jax":
            eager = by_match.get((record["match"], "pytorch"))
            compiled = by_match.get((record["match"], "pytorch-compile"))
            lines.append(f"| {record['row']} | {_cell(record)} | {_cell(eager)} | {_ratio(record, eager)} | "
                         f"{_cell(compiled)} | {_ratio(record, compiled)} |")
        elif record["impl"] == "pytorch" and not any(
                r.get("impl") == "xpsr-jax" and r.get("match") == record["match"] for r in records):
            lines.append(f"| {record['row']} | not run | {_cell(record)} | n/a | | |")
    return "\n".join(lines)


def parity_record(log_text: str) -> dict:
    """The worst `parity LABEL: max-abs E` line of a `pytest -s` log (tests/parity_utils.py) and the
    pass count; raises ValueError when the log has no parity line or a failure."""
    errors = [float(x) for x in re.findall(r"^parity .*?: max-abs ([0-9.eE+-]+)", log_text, re.MULTILINE)]
    passed = re.search(r"(\d+) passed", log_text)
    if not errors or not passed or re.search(r"\d+ (failed|error)", log_text):
        raise ValueError("the parity tests printed no result or failed; see the log")
    return dict(value=max(errors), unit="max-abs error",
                details=f"{len(errors)} outputs compared, {passed.group(1)} tests passed")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "table":
        print(markdown_table(read_records(argv[1])))
        return 0
    if len(argv) == 4 and argv[0] == "parity":
        with open(argv[1], encoding="utf-8") as handle:
            record = parity_record(handle.read())
        append_record(argv[2], row=argv[3], impl="xpsr-jax", **record)
        return 0
    print(__doc__.split("\n\n")[-1].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
