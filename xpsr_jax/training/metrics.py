"""Training metrics on disk: `metrics.jsonl` lines and TensorBoard event files, no TensorFlow.

    writer = MetricsWriter(workdir)                 # process 0 only
    writer.truncate_after(step)                     # on resume: drop lines of lost steps
    writer.write(step, {"loss": 0.1, "mse": 0.09, ...})
    writer.close()

The event files come from tensorboardX's `SummaryWriter` (TFRecord + the Event protobuf, no
TensorFlow); a resumed run purges the steps after its checkpoint (see `MetricsWriter`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


# ----------------------------------------------------------------------------- JSONL


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_number(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN / Infinity


class MetricsWriter:
    """`workdir/metrics.jsonl` (one line per logged step) plus TensorBoard scalars."""

    def __init__(self, workdir: str | os.PathLike, *, resumed_step: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.workdir / METRICS_FILE
        if resumed_step is not None:
            self.truncate_after(resumed_step)
        self._jsonl = open(self.jsonl_path, "a")
        # purge_step: a resumed run's file starts with SessionLog(START) there, which tells
        # TensorBoard to drop the events an interrupted run had written for the steps after it.
        # The nanosecond suffix keeps a writer started in the same second as the last one from
        # replacing its file (tensorboardX names files by the second) and orders them by name.
        self.events = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}",
                                    purge_step=None if resumed_step is None else resumed_step + 1)

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps > `step`: an interrupted run logged steps its checkpoint lacks."""
        kept = [r for r in read_metrics_jsonl(self.jsonl_path) if r.get("step", 0) <= step]
        temporary = self.jsonl_path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(temporary, self.jsonl_path)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for tag, value in values.items():
            self.events.add_scalar(tag, float(value), global_step=int(step))
        self.events.flush()

    def close(self) -> None:
        self._jsonl.close()
        self.events.close()
