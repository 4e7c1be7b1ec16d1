"""Compile time of the train step and the sampling loop: this checkout beside a previous commit.

    python -m benchmarks.compile_time                       # vs HEAD~1, tiny + SD 1.5 lowering, 1 round
    python -m benchmarks.compile_time --baseline 1466988 --rounds 2 --json compile.jsonl
    python -m benchmarks.compile_time --baseline none       # this checkout only

Rows: the tiny train step (the quickstart's: `configs/train.py:tiny` on `xpsr_jax.models.tiny`,
batch 2 at 64 px, float32) and the tiny sampling loop (`configs/infer.py:tiny`, one 32 px LR to
128 px, the pipeline's own compile) are traced, lowered and XLA-compiled; the SD 1.5 size train
step (bf16, batch 1 at 512 px, the default config's remat) is traced and lowered from shapes only
(its XLA compile does not fit this machine). Figures: tracing + lowering seconds (which no
compilation cache skips), XLA compile seconds (the persistent cache is off; the train step with
the options `train.py` gives it, `train_compiler_options`, where the tree has them), the seconds
XLA takes to load the serialized program back (what a compile-cache hit pays after tracing),
the tiny step's median milliseconds, XLA fusions in the compiled program, and ops in the lowered
StableHLO. `--train-options` compiles the train step rows with other XLA options (JSON, '{}' for
XLA's defaults). The `part: ...` rows compile parts of the tiny step alone (the loss forward,
forward + backward, the optimizer, the split of the updated buffer back into tensors); they use
this tree's APIs, so run them with `--baseline none`.

    python -m benchmarks.compile_time --baseline none --rows "train tiny" --train-options '{}'
    python -m benchmarks.compile_time --baseline none --rows "part: loss forward" "part: forward+backward" \
        "part: optimizer" "part: split back"

The baseline is measured in the same run from `git archive` of the given commit: every
measurement runs in a fresh subprocess of this file with that tree first on PYTHONPATH, and the
rounds alternate (this, baseline, this, ...) so machine noise hits both alike. The median of the
rounds is printed, with the ratio this / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ("train tiny", "sample tiny", "train sd15 (lower only)")
# The tiny train step's parts, each compiled alone (this tree's APIs: run with --baseline none).
PARTS = ("part: loss forward", "part: forward+backward", "part: optimizer", "part: split back")
OPTIONS_ENV = "XPSR_COMPILE_TIME_TRAIN_OPTIONS"
_FUSION = re.compile(r"^\s*(?:ROOT\s+)?\S+ = \S+ fusion\(", re.M)


def _fusions(compiled) -> int:
    return len(_FUSION.findall(compiled.as_text()))


def _stablehlo_ops(lowered) -> int:
    return sum(1 for line in lowered.as_text().splitlines() if "stablehlo." in line or "= call @" in line)


def _load_seconds(compiled) -> float:
    """Seconds to load `compiled` back from its serialized form, as a compile-cache hit does."""
    from jax.experimental import serialize_executable

    payload = serialize_executable.serialize(compiled)
    start = time.perf_counter()
    serialize_executable.deserialize_and_load(*payload)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- worker (one row)
# Runs in a subprocess whose `xpsr_jax` is the tree under test; uses only APIs both trees have.

def _tiny_training():
    """The quickstart's training setup on a fresh tiny model: (config, mesh, noise schedule, state,
    frozen, graphdefs)."""
    from xpsr_jax.configs.train import get_config
    from xpsr_jax.models.tiny import write_tiny_model
    from xpsr_jax.schedulers import load_scheduler_config, noise_schedule_from_config
    from xpsr_jax.training import create_train_state, load_training_models, make_mesh

    config = get_config("tiny")
    paths = write_tiny_model(tempfile.mkdtemp(prefix="compile_time_"))
    models = load_training_models(str(paths.sd15), "", config.model.to_dict(), attention_backend="xla")
    schedule = noise_schedule_from_config(load_scheduler_config(paths.sd15 / "scheduler"))
    mesh = make_mesh(config.mesh)
    return (config, mesh, schedule, *create_train_state(models, config, mesh))


def _train_row(size: str) -> dict:
    import jax

    from xpsr_jax.configs.train import get_config
    from xpsr_jax.schedulers import noise_schedule_from_config
    from xpsr_jax.training import make_mesh
    from xpsr_jax.training.step import lower_train_step

    if size == "tiny":
        config, mesh, schedule, state, frozen, graphdefs = _tiny_training()
        batch_size, resolution = int(config.pipeline.batch_size), int(config.pipeline.resolution)
    else:  # SD 1.5 size from shapes: the state is built under eval_shape, nothing is allocated
        from xpsr_jax.models.architectures import architecture
        from xpsr_jax.training.abstract import abstract_train_state, abstract_training_models

        config = get_config()
        config.precision.compute_dtype = "bfloat16"
        config.attention_backend = "xla"
        mesh = make_mesh(config.mesh, jax.devices()[:1])
        models = abstract_training_models(architecture("sd15"), config)
        graphdefs, state, frozen = abstract_train_state(models, config, mesh)
        schedule = noise_schedule_from_config(dict(beta_start=0.00085, beta_end=0.012,
                                                   beta_schedule="scaled_linear", num_train_timesteps=1000))
        batch_size, resolution = 1, int(config.pipeline.resolution)
    batch = _zero_batch(batch_size, resolution)
    lowered, lower_seconds = lower_train_step(config, graphdefs, schedule, mesh, state, frozen, batch)
    row = {"lower_s": lower_seconds, "stablehlo_ops": _stablehlo_ops(lowered),
           "trainable_tensors": len(jax.tree.leaves(state.params))}
    if size == "tiny":
        options = _train_options(config, mesh)
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=options)
        row.update(compile_s=time.perf_counter() - start, fusions=_fusions(compiled), load_s=_load_seconds(compiled),
                   step_ms=_step_ms(compiled, state, frozen, batch))
    return row


def _train_options(config, mesh) -> dict | None:
    """--train-options when given, else the options train.py compiles with (trees from before
    `train_compiler_options` compile with XLA's defaults)."""
    if os.environ.get(OPTIONS_ENV):
        return json.loads(os.environ[OPTIONS_ENV]) or None
    try:
        from xpsr_jax.training.step import train_compiler_options
    except ImportError:
        return None
    return train_compiler_options(config, mesh)


def _step_ms(compiled, state, frozen, batch, steps: int = 12) -> float:
    """Median milliseconds of a step after two warm-up steps (the state is donated and replaced)."""
    import jax

    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def _part_row(part: str) -> dict:
    """One part of the tiny train step jitted and compiled alone, with the train step's options."""
    import jax
    import optax
    from flax import nnx

    from xpsr_jax.training import make_optimizer
    from xpsr_jax.training.loss import latent_shape_for, sample_loss_draws, xpsr_loss
    from xpsr_jax.training.step import flat_layout, merge_models

    config, mesh, schedule, state, frozen, graphdefs = _tiny_training()
    layout = flat_layout(state.params, mesh, config)
    tx = make_optimizer(config.optimizer, int(config.total_steps))
    batch = _zero_batch(int(config.pipeline.batch_size), int(config.pipeline.resolution))

    def loss(params, key):
        vae = nnx.merge(graphdefs["vae"], frozen["vae"])
        draws = sample_loss_draws(key, batch["pixel_values"].shape[0],
                                  latent_shape_for(vae, batch["pixel_values"].shape), schedule.num_train_timesteps)
        return xpsr_loss(merge_models(graphdefs, params, frozen), batch, draws, noise_schedule=schedule,
                         dfc_weight=float(config.loss.dfc_weight))

    def optimizer(params, grads, opt_state):
        old = layout.flatten(params)
        updates, opt_state = tx.update(layout.flatten(grads), opt_state, old)
        return layout.unflatten(optax.apply_updates(old, updates)), opt_state

    key = jax.random.key(0)
    function, args = {
        "part: loss forward": (lambda p, k: loss(p, k)[0], (state.params, key)),
        "part: forward+backward": (lambda p, k: jax.value_and_grad(loss, has_aux=True)(p, k), (state.params, key)),
        "part: optimizer": (optimizer, (state.params, state.params, state.opt_state)),
        "part: split back": (lambda flat: layout.unflatten(jax.tree.map(lambda x: x * 2, flat)),
                             (layout.flatten(state.params),)),
    }[part]
    start = time.perf_counter()
    lowered = jax.jit(function).lower(*args)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=_train_options(config, mesh))
    return {"lower_s": lower_seconds, "compile_s": time.perf_counter() - start, "fusions": _fusions(compiled)}


def _zero_batch(batch_size: int, resolution: int) -> dict:
    import numpy as np

    images = np.zeros((batch_size, resolution, resolution, 3), np.float32)
    ids = np.zeros((batch_size, 77), np.int32)
    return {"pixel_values": images, "conditioning_pixel_values": images, "highlevel_input_ids": ids,
            "lowlevel_input_ids": ids}


def _sample_row() -> dict:
    import numpy as np

    from xpsr_jax.configs.infer import get_config
    from xpsr_jax.inference.pipeline import XPSRPipeline
    from xpsr_jax.models.tiny import write_tiny_model

    paths = write_tiny_model(tempfile.mkdtemp(prefix="compile_time_"))
    config = get_config("tiny")
    pipeline = XPSRPipeline.from_pretrained(paths.xpsr, paths.sd15, config=config)
    messages = []
    pipeline.on_compile = messages.append
    lr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pipeline([lr], ["a photo"], ["sharp"], seeds=[0])
    done = next(m for m in messages if m.startswith("compiled"))
    lower = float(re.search(r"tracing and lowering ([\d.]+) s", done).group(1))
    compiled = list(pipeline._compiled.values())[-1]  # the sampler just compiled
    return {"lower_s": lower, "compile_s": pipeline.compile_seconds - lower, "fusions": _fusions(compiled),
            "load_s": _load_seconds(compiled)}


def worker(row: str) -> dict:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # XLA compiles every time
    if row == "train tiny":
        return _train_row("tiny")
    if row == "sample tiny":
        return _sample_row()
    if row in PARTS:
        return _part_row(row)
    return _train_row("sd15")


# ----------------------------------------------------------------------------- driver

def _checkout(revision: str, into: Path) -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", revision], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def _measure(tree: Path, row: str, timeout: float, train_options: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if train_options is not None:
        env[OPTIONS_ENV] = train_options
    done = subprocess.run([sys.executable, __file__, "--worker", row], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1][4:])


def _median(results: list[dict], key: str):
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if digits else f"{int(value):,}"


def _ratio(now, before) -> str:
    return f"{now / before:.2f}x" if now is not None and before else "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--baseline", default="HEAD~1", help="commit to compare with ('none': this tree only)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS + PARTS)
    parser.add_argument("--train-options", help="XLA options (JSON) for the train step rows instead of the ones "
                        "train.py uses, in both trees; '{}' = XLA's defaults")
    parser.add_argument("--rounds", type=int, default=1, help="alternating measurements of each tree per row")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per measurement")
    parser.add_argument("--json", help="append one record per row and tree here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(worker(args.worker)), flush=True)
        return 0

    trees = {"this": REPO}
    with tempfile.TemporaryDirectory(prefix="compile_time_baseline_") as scratch:
        label = "none"
        if args.baseline != "none":
            label = _checkout(args.baseline, Path(scratch))
            trees["baseline"] = Path(scratch)
        load = os.getloadavg()[0]
        results: dict = {(row, name): [] for row in args.rows for name in trees}
        for row in args.rows:
            for round_ in range(args.rounds):
                for name, tree in trees.items():
                    result = _measure(tree, row, args.timeout, args.train_options)
                    results[row, name].append(result)
                    print(f"  {row}, {name}, round {round_ + 1}: {result}", file=sys.stderr, flush=True)
    print(f"\nCompile time, {os.cpu_count()} CPUs, load {load:.1f} at start, median of {args.rounds} round(s); "
          f"baseline {label}\n")
    columns = ["row", "tracing+lowering s", "XLA compile s", "total s", "cache load s", "step ms", "XLA fusions",
               "StableHLO ops"]
    if "baseline" in trees:
        columns += ["baseline: tracing+lowering s", "XLA compile s", "total s", "cache load s", "step ms",
                    "XLA fusions", "StableHLO ops", "total: this / baseline"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in args.rows:
        cells = []
        totals = []
        for name in trees:
            runs = [r for r in results[row, name] if "error" not in r]
            if args.json:
                with open(args.json, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"row": row, "tree": name if name == "this" else label,
                                             "runs": results[row, name]}) + "\n")
            if not runs:
                cells += [f"error: {results[row, name][0]['error']}"] + ["n/a"] * 6
                totals.append(None)
                continue
            lower, compile_ = _median(runs, "lower_s"), _median(runs, "compile_s")
            total = lower + compile_ if compile_ is not None else None
            totals.append(total)
            cells += [_cell(lower), _cell(compile_), _cell(total), _cell(_median(runs, "load_s")),
                      _cell(_median(runs, "step_ms")),
                      _cell(_median(runs, "fusions"), 0),
                      _cell(_median(runs, "stablehlo_ops"), 0)]
        if "baseline" in trees:
            cells.append(_ratio(totals[0], totals[1]) if totals[1] is not None else
                         _ratio(_median(results[row, "this"], "lower_s"), _median(results[row, "baseline"], "lower_s"))
                         + " (lowering)")
        print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
