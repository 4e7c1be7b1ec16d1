"""The study's result in the layout of the paper's supplement Table 1: each method's selection
rate with a 95% Wilson interval, participants and votes, per-image counts, and a bar chart.

    report = summarize(VoteStore.read("votes.sqlite"))
    write_report(report, "study-report")      # report.md, report.json, selection_rates.png

The interval treats votes as independent draws; votes of one participant are not quite that, so
read it as a lower bound on the uncertainty.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from scipy.stats import binomtest

from xpsr_jax.files import write_bytes_atomic
from xpsr_jax.evaluation.paper import PAPER_USER_STUDY
from xpsr_jax.study.store import StudyError, VoteStore

CONFIDENCE = 0.95


@dataclass
class MethodRate:
    method: str
    votes: int
    rate: float | None  # of all votes; None before the first vote
    ci95: tuple[float, float] | None  # Wilson score interval
    paper_rate: float | None  # supplement Table 1, when the method has a name from it


@dataclass
class StudyReport:
    participants: int
    votes: int  # one per participant and image (replaced ones not counted)
    replaced: int  # votes that replaced an earlier vote of the same participant and image
    images: int
    methods: list[MethodRate]
    per_image: dict[str, dict[str, int]]  # image -> method -> votes


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _paper_rate(method: str) -> float | None:
    return next((rate for name, rate in PAPER_USER_STUDY.items() if name.lower() == method.lower()), None)


def summarize(store: VoteStore) -> StudyReport:
    counts, totals = store.counts(), store.totals()
    votes = totals["votes"]
    methods = []
    for method in store.methods:
        chosen = sum(count for (_, name), count in counts.items() if name == method)
        methods.append(MethodRate(method, chosen, chosen / votes if votes else None,
                                  wilson_interval(chosen, votes) if votes else None, _paper_rate(method)))
    per_image = {image: {method: counts.get((image, method), 0) for method in store.methods} for image in store.images}
    return StudyReport(totals["participants"], votes, totals["replaced"], len(store.images), methods, per_image)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def to_markdown(report: StudyReport) -> str:
    names = [m.method for m in report.methods]
    lines = ["# Blind user study: selection rates", "",
             f"{report.participants} participant(s), {report.votes} vote(s) over {report.images} image(s)"
             + (f" ({report.replaced} changed by a later vote)" if report.replaced else "")
             + "; each vote picks the best of the results shown beside the LR, in a random order, unnamed.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| selection rate | " + " | ".join(_percent(m.rate) for m in report.methods) + " |",
             "| 95% CI (Wilson) | " + " | ".join("-" if m.ci95 is None else
                                                f"{_percent(m.ci95[0])} - {_percent(m.ci95[1])}"
                                                for m in report.methods) + " |",
             "| votes | " + " | ".join(str(m.votes) for m in report.methods) + " |"]
    if any(m.paper_rate is not None for m in report.methods):
        lines.append("| paper (supplement Table 1) | " + " | ".join(_percent(m.paper_rate) for m in report.methods)
                     + " |")
    lines += ["", "## Votes per image", "", "| image | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {_cell(image)} | " + " | ".join(str(row[name]) for name in names) + " |"
              for image, row in report.per_image.items()]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """An image id (a file name: any character) as one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_json(report: StudyReport) -> dict:
    return asdict(report)


def chart_png(report: StudyReport) -> bytes:
    """A bar chart of the selection rates with their 95% intervals, as PNG bytes."""
    from matplotlib.figure import Figure  # lazy: the optional [demo] extra (no pyplot, no display needed)

    figure = Figure(figsize=(1.2 * len(report.methods) + 2, 3.6), dpi=120)
    axes = figure.add_subplot()
    rates = [100 * (m.rate or 0.0) for m in report.methods]
    low = [rate - 100 * m.ci95[0] if m.ci95 else 0.0 for rate, m in zip(rates, report.methods)]
    high = [100 * m.ci95[1] - rate if m.ci95 else 0.0 for rate, m in zip(rates, report.methods)]
    positions = range(len(rates))
    axes.bar(positions, rates, yerr=[low, high], capsize=4, color="#4c72b0", label="this study (95% CI)")
    paper = [(i, 100 * m.paper_rate) for i, m in enumerate(report.methods) if m.paper_rate is not None]
    if paper:
        axes.scatter([i for i, _ in paper], [r for _, r in paper], marker="D", color="#dd8452", zorder=3,
                     label="paper (supplement Table 1)")
    axes.set_xticks(list(positions), [m.method for m in report.methods])
    axes.set_ylabel("selection rate (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"{report.votes} votes, {report.participants} participant(s)")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(report: StudyReport, out: str | Path) -> list[Path]:
    """report.md, report.json and selection_rates.png in `out` (made if missing), each written
    whole or not at all."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out}: exists and is not a folder")
    contents = {"report.md": to_markdown(report).encode(), "report.json": (json.dumps(to_json(report), indent=2)
                                                                          + "\n").encode(),
                "selection_rates.png": chart_png(report)}
    for name, data in contents.items():
        try:
            write_bytes_atomic(out / name, data)
        except OSError as error:
            raise StudyError(f"--out {out}: cannot write {name} there ({error.strerror or error})") from None
    return [out / name for name in contents]
