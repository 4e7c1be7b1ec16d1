"""`python -m xpsr_jax.quickstart`: the whole XPSR chain on a CPU, in one command.

    python -m xpsr_jax.quickstart --workdir /tmp/xpsr-quickstart [--steps 200]

Stages, each one the project's real entry point called in this process:

1. model     the tiny random SD 1.5 + XPSR model (`xpsr_jax.models.tiny.write_tiny_model`)
2. data      `python -m xpsr_jax.data.prepare` over `examples/hr`: crop + Real-ESRGAN degradation
             -> `--captions examples/captions.jsonl` (stands in for the LLaVA step) -> TFDS
3. train     `configs/train.py:tiny` for `--steps` steps (`xpsr_jax.training.loop.train`)
4. export    `python -m xpsr_jax.export torch`: the last checkpoint -> an official-layout release
5. infer     `python -m xpsr_jax.infer` with that release on the degraded LR images (`configs/infer.py:tiny`)
6. evaluate  `python -m xpsr_jax.evaluate` (PSNR/SSIM, Y channel) of the SR images against the HR

Rerunning with the same --workdir resumes: finished stages are kept (recorded in
WORKDIR/quickstart.json), an interrupted stage is redone (training continues from its latest
checkpoint). A larger --steps continues training and redoes export, infer and evaluate; a
smaller one is an error. A --workdir that holds anything else is refused.

Public API: `main(argv) -> int`, `run_quickstart(workdir, steps, examples) -> dict` (the summary),
`QuickstartError`, `STAGES`, `DEFAULT_STEPS`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from xpsr_jax.cli_config import CommandParser, ConfigFlagError, load_config_file
from xpsr_jax.compile_cache import enable_compile_cache
from xpsr_jax.data import images, prepare, tfds_builder
from xpsr_jax.evaluation.cli import main as evaluate_main
from xpsr_jax.examples import PACKAGED_EXAMPLES
from xpsr_jax.export.cli import main as export_main
from xpsr_jax.files import image_files
from xpsr_jax.inference.cli import main as infer_main
from xpsr_jax.models.tiny import write_tiny_model
from xpsr_jax.training.config import ConfigError
from xpsr_jax.training.loop import TrainingDiverged, train
from xpsr_jax.training.metrics import METRICS_FILE, read_metrics_jsonl

TRAIN_CONFIG = "configs/train.py"  # the packaged configs (xpsr_jax/configs/)
INFER_CONFIG = "configs/infer.py"
DEFAULT_STEPS = 200
STAGES = ("model", "data", "train", "export", "infer", "evaluate")
STATE_FILE = "quickstart.json"
STATE_VERSION = 1
METRICS = "psnr,ssim"  # full-reference metrics that need no downloaded weights
# Folders inside the workdir, one per stage (and XLA's compilation cache).
LAYOUT = {"model": "model", "prepare": "prepare", "tfds": "tfds", "train": "train",
          "release": "release", "sr": "sr", "eval": "eval", "jax_cache": "jax_cache"}


class QuickstartError(RuntimeError):
    """A stage failed or the input is unusable; the message names the stage / path."""


# ----------------------------------------------------------------------------- workdir state


def _read_state(workdir: Path, examples: Path) -> dict:
    """The state of a resumable workdir, or a fresh one; refuses a folder that is not ours."""
    if workdir.exists() and not workdir.is_dir():
        raise QuickstartError(f"--workdir {workdir} exists and is not a folder")
    state_path = workdir / STATE_FILE
    if not state_path.is_file():
        found = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
        if found:
            raise QuickstartError(
                f"--workdir {workdir} exists and holds files the quickstart did not write "
                f"({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}); pass a new or "
                "empty folder")
        return {"tool": "xpsr_jax.quickstart", "version": STATE_VERSION,
                "examples": str(examples), "stages": {}}
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as error:
        raise QuickstartError(f"{state_path} is not valid JSON ({error}); use a new --workdir"
                              ) from error
    if not isinstance(state, dict) or state.get("tool") != "xpsr_jax.quickstart" \
            or state.get("version") != STATE_VERSION:
        raise QuickstartError(f"{state_path} was not written by this version of the quickstart; "
                              "use a new --workdir")
    if state.get("examples") != str(examples):
        raise QuickstartError(f"--workdir {workdir} was made from --examples "
                              f"{state.get('examples')}, not {examples}; use the same --examples "
                              "or a new --workdir")
    return state


def _write_state(workdir: Path, state: dict) -> None:
    path = workdir / STATE_FILE
    temporary = path.with_name(f".{STATE_FILE}.tmp")
    temporary.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(temporary, path)


def _check_examples(examples: Path) -> tuple[Path, Path, int]:
    """(hr folder, captions file, crop size) of an examples folder."""

    hr_dir, captions = examples / "hr", examples / "captions.jsonl"
    for path, what in ((hr_dir, "a folder hr/ of HR images"), (captions, "captions.jsonl")):
        if not path.exists():
            raise QuickstartError(f"--examples {examples}: {path} is missing; the folder needs "
                                  f"{what} (see examples/README.md in the repository)")
    files = image_files(hr_dir, "--examples", error=QuickstartError)
    # One crop per image, the largest square all of them hold (a multiple of the x4 scale),
    # so every crop id is "<file stem>_000", the ids of captions.jsonl.
    side = min(min(images.image_size(path)) for path in files) // 4 * 4
    if side < 64:
        raise QuickstartError(f"--examples {examples}: the smallest image in {hr_dir} is under "
                              "64 px; the tiny training config crops 64 px")
    return hr_dir, captions, side


# ----------------------------------------------------------------------------- stages


def _status(name: str, code) -> None:
    """Entry points that return (or exit with) a status: non-zero is a failed stage."""
    if code:
        raise QuickstartError(f"stage {name} failed with exit status {code} (its error is above)")


def _show(command: str, argv: Sequence[str]) -> None:
    """The shell command a stage is equivalent to, ready to paste."""
    print(f"  $ {command} {shlex.join(str(a) for a in argv)}", flush=True)


def _call(name: str, command: str, entry_point: Callable[[list[str]], int], argv: list[str]) -> None:
    _show(command, argv)
    try:
        code = entry_point(argv)
    except SystemExit as exit_:  # argparse errors (prepare, export)
        code = exit_.code
    _status(name, code)


def stage_model(paths: dict[str, Path], **_) -> dict:
    shutil.rmtree(paths["model"], ignore_errors=True)  # a half-written model from a killed run
    _show("python -m xpsr_jax.models.tiny", ["--out", paths["model"]])
    model = write_tiny_model(paths["model"], seed=0)
    return {"sd15": str(model.sd15), "xpsr": str(model.xpsr)}


def stage_data(paths: dict[str, Path], hr_dir: Path, captions: Path, crop_size: int, **_) -> dict:
    # --hr-target original: the stored HR is the example itself, so it is also the GT of stage 6.
    _call("data", "python -m xpsr_jax.data.prepare", prepare.main, [
        "--hr-dir", str(hr_dir), "--work-dir", str(paths["prepare"]),
        "--data-dir", str(paths["tfds"]), "--captions", str(captions),
        "--crop-size", str(crop_size), "--hr-target", "original"])
    return {"lr": str(paths["prepare"] / "LR"), "hr": str(paths["prepare"] / "HR"),
            "dataset": str(tfds_builder.dataset_dir(paths["tfds"], "prepared"))}


def stage_train(paths: dict[str, Path], steps: int, **_) -> dict:
    config = load_config_file(f"{TRAIN_CONFIG}:tiny")
    config.base_model = str(paths["model"] / "sd15")
    config.pipeline.data_dir = str(paths["tfds"])
    config.total_steps = steps
    config.checkpoint_every = max(1, min(100, steps))  # a kill loses at most 100 steps
    _show("python -m xpsr_jax.train", ["--config", f"{TRAIN_CONFIG}:tiny", "--workdir", paths["train"],
                                       f"--config.base_model={config.base_model}",
                                       f"--config.pipeline.data_dir={config.pipeline.data_dir}",
                                       f"--config.total_steps={steps}",
                                       f"--config.checkpoint_every={config.checkpoint_every}"])
    try:
        result = train(config, paths["train"])
    except (ConfigFlagError, ConfigError, TrainingDiverged) as error:
        raise QuickstartError(f"stage train: {error}") from error
    losses = [r["loss"] for r in read_metrics_jsonl(paths["train"] / METRICS_FILE)
              if isinstance(r.get("loss"), (int, float))]
    window = max(1, min(10, len(losses) // 2))
    return {"workdir": str(paths["train"]), "steps": result.final_step,
            "compile_seconds": round(result.compile_seconds, 1),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "loss_first_mean": _mean(losses[:window]), "loss_last_mean": _mean(losses[-window:]),
            "loss_window": window}


def stage_export(paths: dict[str, Path], **_) -> dict:
    shutil.rmtree(paths["release"], ignore_errors=True)  # redo from the current checkpoint
    _call("export", "python -m xpsr_jax.export", export_main, ["torch", "--workdir", str(paths["train"]),
                                  "--out", str(paths["release"])])
    return {"release": str(paths["release"])}


def stage_infer(paths: dict[str, Path], captions: Path, **_) -> dict:
    _call("infer", "python -m xpsr_jax.infer", infer_main, [
        "--weights", str(paths["release"]), "--sd15", str(paths["model"] / "sd15"),
        "--input", str(paths["prepare"] / "LR"), "--output", str(paths["sr"]),
        "--config", f"{INFER_CONFIG}:tiny", "--captions", str(captions), "--overwrite"])
    return {"sr": str(paths["sr"]), "images": len(list(paths["sr"].glob("*.png")))}


def stage_evaluate(paths: dict[str, Path], **_) -> dict:
    _call("evaluate", "python -m xpsr_jax.evaluate", evaluate_main, [
        "--pred", str(paths["sr"]), "--gt", str(paths["prepare"] / "HR"), "--metrics", METRICS,
        "--out", str(paths["eval"]), "--no-progress"])
    means = json.loads((paths["eval"] / "means.json").read_text())
    return {"eval": str(paths["eval"]), "num_images": means["num_images"],
            **{name: means["means"][name] for name in METRICS.split(",")}}


STAGE_FUNCTIONS = {"model": stage_model, "data": stage_data, "train": stage_train,
                   "export": stage_export, "infer": stage_infer, "evaluate": stage_evaluate}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- the chain


def run_quickstart(workdir: str | os.PathLike, steps: int = DEFAULT_STEPS,
                   examples: str | os.PathLike = PACKAGED_EXAMPLES) -> dict:
    """Runs (or resumes) the chain in `workdir`; returns the summary also written to
    WORKDIR/summary.json. Raises QuickstartError naming the stage that failed."""
    if steps < 1:
        raise QuickstartError(f"--steps {steps} must be >= 1")
    workdir, examples = Path(workdir).absolute(), Path(examples).absolute()
    hr_dir, captions, crop_size = _check_examples(examples)
    state = _read_state(workdir, examples)
    trained = state["stages"].get("train", {}).get("result", {}).get("steps")
    if trained is not None and steps < trained:
        raise QuickstartError(f"--workdir {workdir} is trained to {trained} steps; pass --steps "
                              f">= {trained} or a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    _write_state(workdir, state)
    paths = {key: workdir / name for key, name in LAYOUT.items()}
    # XLA's CPU compile of the train step is most of the chain's time: keep compiled programs in
    # the workdir, so a rerun with more --steps loads them (unless the user set a cache).
    enable_compile_cache(paths["jax_cache"])
    inputs = {"model": {}, "data": {"crop_size": crop_size}, "train": {"steps": steps}}
    start, redo = time.perf_counter(), False
    for number, name in enumerate(STAGES, 1):
        record = state["stages"].get(name)
        wanted = inputs.get(name, {})
        if record and record.get("inputs") == wanted and not redo:
            print(f"[{number}/{len(STAGES)}] {name}: kept from the last run "
                  f"({record['seconds']:.1f} s then)", flush=True)
            continue
        redo = True  # every later stage depends on this one
        state["stages"].pop(name, None)
        _write_state(workdir, state)
        print(f"[{number}/{len(STAGES)}] {name} ...", flush=True)
        stage_start = time.perf_counter()
        result = STAGE_FUNCTIONS[name](paths=paths, hr_dir=hr_dir, captions=captions,
                                       crop_size=crop_size, steps=steps)
        seconds = time.perf_counter() - stage_start
        state["stages"][name] = {"inputs": wanted, "seconds": round(seconds, 1),
                                 "result": result}
        _write_state(workdir, state)
        print(f"[{number}/{len(STAGES)}] {name}: done in {seconds:.1f} s -> "
              f"{_where(name, result)}", flush=True)
    summary = {"workdir": str(workdir), "wall_seconds_this_run": round(time.perf_counter() - start, 1),
               "stages": state["stages"]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary), flush=True)
    return summary


def _where(name: str, result: dict) -> str:
    return {"model": lambda r: f"{r['sd15']} + {r['xpsr']}",
            "data": lambda r: r["dataset"],
            "train": lambda r: f"{r['workdir']} (step {r['steps']})",
            "export": lambda r: r["release"],
            "infer": lambda r: f"{r['sr']} ({r['images']} images)",
            "evaluate": lambda r: r["eval"]}[name](result)


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def format_summary(summary: dict) -> str:
    """The closing summary: what was made, where, and how long each stage took."""
    stages = summary["stages"]
    train, evaluation = stages["train"]["result"], stages["evaluate"]["result"]
    lines = [
        "",
        "quickstart summary",
        f"  tiny model     {stages['model']['result']['sd15']}, {stages['model']['result']['xpsr']}",
        f"  LR / HR        {stages['data']['result']['lr']}, {stages['data']['result']['hr']}",
        f"  dataset        {stages['data']['result']['dataset']}",
        f"  training       {train['workdir']}: {train['steps']} steps, loss first "
        f"{_number(train['loss_first'])} last {_number(train['loss_last'])} (mean of "
        f"{train['loss_window']}: {_number(train['loss_first_mean'])} -> "
        f"{_number(train['loss_last_mean'])}), train step compiled in "
        f"{train['compile_seconds']:.1f} s",
        f"  release        {stages['export']['result']['release']} (official PyTorch layout)",
        f"  SR images      {stages['infer']['result']['sr']} ({stages['infer']['result']['images']})",
        f"  evaluation     {evaluation['eval']}: PSNR {_number(evaluation['psnr'], 2)} dB, "
        f"SSIM {_number(evaluation['ssim'])} (Y channel, {evaluation['num_images']} images)",
        "  wall time      " + ", ".join(f"{name} {stages[name]['seconds']:.1f} s" for name in STAGES)
        + f"; this run {summary['wall_seconds_this_run']:.1f} s",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m xpsr_jax.quickstart",
        description="The whole XPSR chain on a CPU: tiny model -> TFDS data -> train -> export "
                    "-> infer -> evaluate.",
        epilog="Rerunning with the same --workdir keeps the finished stages and resumes.")
    parser.add_argument("--workdir", default="xpsr-quickstart",
                        help="folder for everything the chain writes (default: ./xpsr-quickstart)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--examples", default=str(PACKAGED_EXAMPLES),
                        help="folder with hr/ (HR images) and captions.jsonl "
                             "(default: the repository's examples/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_quickstart(args.workdir, steps=args.steps, examples=args.examples)
    except QuickstartError as error:
        print(f"quickstart: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
