"""The GPU check's table builder (benchmarks/records.py) on hand-made records: errors, ratios,
parity. The dry run of the whole script (benchmarks/gpu_check.sh --dry-run: every row on the
CPU at tiny size) compiles the train step twice and takes far longer than the suite's budget on
a 2-core CPU; it is tests/gpu_check_dry_run.py, run explicitly:

    python -m pytest tests/gpu_check_dry_run.py -q
"""

from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import records  # noqa: E402

def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| benchmark", "|---")):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table_marks_errors_and_compares_times(tmp_path):
    path = str(tmp_path / "r.jsonl")
    records.append_record(path, row="train, batch 1, remat none", match="train, batch 1", impl="xpsr-jax",
                          value=4.0, unit="images/s")
    records.append_record(path, row="train, batch 1", impl="pytorch", value=2.0, unit="images/s")
    records.append_record(path, row="sampling, batch 1", impl="xpsr-jax", value=1.5, unit="s/image")
    records.append_record(path, row="sampling, batch 1", impl="pytorch", value=3.0, unit="s/image")
    records.append_record(path, row="sampling, batch 1", impl="pytorch-compile", value=None, unit="s/image",
                          details="failed after 90 s: RowTimeout")
    records.append_record(path, row="sampling, xpsr-jax, batch 8", error="timed out after 120 s")
    rows = _table_rows(records.markdown_table(records.read_records(path)))
    assert rows["train, batch 1, remat none"][:3] == ["4 images/s", "2 images/s", "0.50"]  # time per image
    assert rows["sampling, batch 1"][2:5] == ["0.50", "failed after 90 s: RowTimeout", "n/a"]
    assert rows["sampling, xpsr-jax, batch 8"][0] == "error: timed out after 120 s"
    with pytest.raises(ValueError, match="impl 'jax' is not one of"):
        records.append_record(path, row="x", impl="jax", value=1.0, unit="s")


def test_parity_record_needs_passing_results():
    log = "parity a: max-abs 1.0e-06, relative 2e-06\nparity b: max-abs 4.0e-06, relative 1e-05\n2 passed in 9s"
    assert records.parity_record(log) == dict(value=4e-6, unit="max-abs error",
                                              details="2 outputs compared, 2 tests passed")
    with pytest.raises(ValueError, match="printed no result or failed"):
        records.parity_record(log.replace("2 passed", "1 failed, 1 passed"))
