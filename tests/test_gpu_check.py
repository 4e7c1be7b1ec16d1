"""The GPU check (benchmarks/gpu_check.sh): its table builder (benchmarks/common.py) on hand-made
records (errors, ratios, parity), and the whole script's --dry-run: every row on the CPU at tiny
("micro") size, whose table must have a number in every cell it fills (a crashed or timed-out row
shows `error:`). The dry run costs a few CPU minutes (two train-step compiles in parallel, the
sampling loop, PyTorch eager and torch.compile(backend="eager")).
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
from benchmarks import common as records


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


# The dry run's rows (benchmarks/gpu_check.sh, --dry-run settings): name -> must the PyTorch eager
# and torch.compile cells hold numbers too?
TRAIN = "train 64 px, bfloat16, per-device batch {b}, remat {r}"
SAMPLING = "sampling 64 px, 2 steps, bfloat16, batch {b}"
EXPECTED = {records_row: (eager, compiled) for records_row, eager, compiled in [
    ("parity with the PyTorch reference (fp32, XPSR SFA ControlNet + UNet)", False, False),
    *[(TRAIN.format(b=1, r=r), True, True) for r in ("none", "attention")],
    (SAMPLING.format(b=1), True, True),
    ("one-step sampling 64 px, bfloat16, batch 1", True, False),
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


def test_dry_run_profiles_train_and_sampling(dry_run):
    """The profile row: per-kind summaries of real traces of both programs, and the raw archive."""
    import json
    import tarfile

    _, out = dry_run
    summaries = json.loads((out / "profile.json").read_text())
    assert set(summaries) == {"train", "sampling"}, summaries.keys()
    for name, summary in summaries.items():
        kinds = summary["kinds"]
        assert summary["module_match"] == "matched", (name, summary["modules"])
        for kind in ("convolution", "attention", "normalization", "matmul"):
            assert kinds[kind]["ms_per_step"] > 0, (name, kind, kinds)
        assert summary["step_ms"] > 0 and kinds["convolution"]["percent_of_step"] > 0
    text = (out / "profile.md").read_text()
    assert "### Profile: train" in text and "### Profile: sampling" in text
    assert "| kind | ms / step |" in (out / "gpu_check.md").read_text(), "the kind tables are not in the report"
    with tarfile.open(out / "profile_raw.tar.gz") as archive:
        names = archive.getnames()
    assert any(n.endswith("train.hlo.txt") for n in names) and any(n.endswith(".xplane.pb") for n in names), names
