"""benchmarks/gpu_check.sh --dry-run runs every row of the GPU check on the CPU at tiny size, and
its table has a number in every cell it must fill (a crashed or timed-out row shows `error:`).
Not collected by the default suite (see tests/test_gpu_check.py); run explicitly:

    python -m pytest tests/gpu_check_dry_run.py -q
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

from test_gpu_check import _table_rows

REPO = pathlib.Path(__file__).resolve().parent.parent

# The dry run's rows (benchmarks/gpu_check.sh, --dry-run settings): name -> must the PyTorch eager
# and torch.compile cells hold numbers too?
TRAIN = "train 64 px, bfloat16, per-device batch {b}, remat {r}"
SAMPLING = "sampling 64 px, 2 steps, bfloat16, batch {b}"
EXPECTED = {records_row: (eager, compiled) for records_row, eager, compiled in [
    ("parity with the PyTorch reference (fp32, XPSR SFA ControlNet + UNet)", False, False),
    *[(TRAIN.format(b=1, r=r), True, True) for r in ("none", "attention")],
    (SAMPLING.format(b=1), True, True),
]}
NUMBER = re.compile(r"^\d[\d.,e+-]* ")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, timeout=1200)
    return done, out


def test_dry_run_fills_every_row(dry_run):
    done, out = dry_run
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert (out / "gpu_check.md").exists(), f"no table written; stdout:\n{done.stdout[-3000:]}\nlog:\n{log[-3000:]}"
    table = (out / "gpu_check.md").read_text()
    assert done.returncode == 0 and "| error: " not in table, f"a row failed:\n{table}\nlog tail:\n{log[-4000:]}"
    assert done.stdout.rstrip().endswith(table.rstrip()[-200:]), "the table is not printed at the end"
    rows = _table_rows(table)
    assert set(EXPECTED) <= set(rows), f"missing rows {sorted(set(EXPECTED) - set(rows))} in:\n{table}"
    for name, (eager, compiled) in EXPECTED.items():
        ours_cell, eager_cell, ratio, compile_cell, compile_ratio = rows[name][:5]
        assert NUMBER.match(ours_cell), f"{name}: xpsr-jax cell {ours_cell!r}"
        if eager:
            assert NUMBER.match(eager_cell) and float(ratio) > 0, f"{name}: PyTorch cells {eager_cell!r}, {ratio!r}"
        if compiled:
            assert NUMBER.match(compile_cell) and float(compile_ratio) > 0, f"{name}: torch.compile {compile_cell!r}"
    parity = rows[next(iter(EXPECTED))][0]
    assert float(parity.split()[0]) < 1e-3, parity
