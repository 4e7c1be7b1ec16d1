"""Evaluation reports: a per-image CSV, and the mean table as Markdown and JSON.

    write_reports(out_dir, result) -> dict[kind, Path]     per_image.csv, means.md, means.json
    markdown_table(result) -> str                          the mean table (with paper column)

`EvaluationResult` holds the per-image scores ({stem: {metric: value}}), the means (set metrics
such as FID appear only there), the metrics that could not run with the reason, and optionally
the paper's numbers for comparison.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path


@dataclasses.dataclass
class EvaluationResult:
    metrics: list[str]  # metrics that ran, in report order
    per_image: dict[str, dict[str, float]]  # stem -> metric -> value
    means: dict[str, float]
    unavailable: dict[str, str]  # metric -> why it did not run
    settings: dict  # pred/gt folders, crop border, mode
    paper: dict[str, float] | None = None
    dataset: str | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # image stem -> why not scored


def markdown_table(result: EvaluationResult) -> str:
    """| metric | ours | paper | rows for every metric that ran (paper column with --paper)."""
    with_paper = result.paper is not None
    header = "| metric | ours |" + (f" paper ({result.dataset}) |" if with_paper else "")
    rule = "|---|---:|" + ("---:|" if with_paper else "")
    lines = [header, rule]
    names = list(result.metrics)
    if with_paper:
        names += [name for name in result.paper if name not in names]
    for name in names:
        ours = _format(result.means[name]) if name in result.means else "n/a"
        row = f"| {name} | {ours} |"
        if with_paper:
            row += f" {_format(result.paper[name]) if name in result.paper else ''} |"
        lines.append(row)
    return "\n".join(lines)


def unavailable_text(result: EvaluationResult) -> str:
    """One line per reason, naming the metrics it holds back (pyiqa missing stops eight metrics
    for one reason: one line, not eight); empty when all ran."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in result.unavailable.items():
        by_reason.setdefault(reason, []).append(name)
    return "\n".join(f"  {', '.join(names)}: {reason}" for reason, names in by_reason.items())


def write_reports(out_dir: str | Path, result: EvaluationResult) -> dict[str, Path]:
    """Writes per_image.csv, means.md and means.json into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "per_image.csv",
        "markdown": out_dir / "means.md",
        "json": out_dir / "means.json",
    }
    per_image_metrics = [name for name in result.metrics if any(
        name in scores for scores in result.per_image.values())]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *per_image_metrics])
        for stem, scores in result.per_image.items():
            writer.writerow([stem, *(repr(float(scores[name])) for name in per_image_metrics)])
    markdown = markdown_table(result) + "\n"
    if result.unavailable:
        markdown += "\nNot computed:\n\n" + "\n".join(
            f"- {name}: {reason}" for name, reason in result.unavailable.items()) + "\n"
    if result.skipped:
        markdown += "\nNot scored:\n\n" + "\n".join(
            f"- {stem}: {reason}" for stem, reason in result.skipped.items()) + "\n"
    paths["markdown"].write_text(markdown)
    summary = {
        "num_images": len(result.per_image),
        "skipped": result.skipped,
        "means": {name: _json_number(value) for name, value in result.means.items()},
        "unavailable": result.unavailable,
        "settings": result.settings,
    }
    if result.paper is not None:
        summary["paper"] = {"dataset": result.dataset, **result.paper}
    paths["json"].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return paths


def _format(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _json_number(value: float):
    # JSON has no inf (PSNR of identical images); keep it readable instead of invalid.
    return value if math.isfinite(value) else str(value)
