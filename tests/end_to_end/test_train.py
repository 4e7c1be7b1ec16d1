"""End-to-end training runs of train.py on the tiny model: the loss curve and periodic validation
grids, SIGTERM / SIGKILL resume step for step, and a real two-process run whose checkpoint
continues in one process.

Every run is a subprocess sharing one persistent JAX compilation cache, so the train step is
compiled twice in all (the 1-process 4-device program and the 2-process one); the other runs
load it from the cache (keep it between pytest runs with XPSR_TEST_COMPILE_CACHE=/some/folder).

    python -m pytest tests/end_to_end/test_train.py -q -s
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.tensorboard_events import read_scalars
from tests.helpers.train_cli_fixtures import (run_and_signal, run_train, run_two_processes,
                                write_validation_images)
from xpsr_jax.training import metrics as metrics_lib
from xpsr_jax.training.checkpoint import read_checkpoint_meta

from tests.test_train_cli import LOSS_KEYS, TOTAL_STEPS, losses, setup  # noqa: F401  (setup: a fixture)

pytestmark = pytest.mark.end_to_end



# ----------------------------------------------------------------------------- TensorBoard




# ----------------------------------------------------------------------------- runs

RUN_FLAGS = (f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every=3",
             "--config.keep_checkpoints=2", "--config.log_every=1")


VALIDATE_EVERY = 6


@pytest.fixture(scope="module")
def reference_run(setup, tmp_path_factory):
    """One uninterrupted 1-process run on 4 CPU devices (global batch 4), validating every
    VALIDATE_EVERY steps on one image."""
    root = tmp_path_factory.mktemp("reference")
    lr_dir = write_validation_images(root / "validation_images")
    workdir = root / "run"
    done = run_train(setup, workdir, *RUN_FLAGS, "--config.pipeline.batch_size=4",
                     f"--config.validation.every={VALIDATE_EVERY}", f"--config.validation.lr_dir={lr_dir}",
                     "--config.validation.num_images=1",
                     "--config.validation.infer_config=configs/infer.py:validation,tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


@pytest.mark.slow
def test_tiny_config_trains_and_its_loss_decreases(reference_run):
    workdir, done = reference_run
    curve = losses(workdir)
    assert sorted(curve) == list(range(1, TOTAL_STEPS + 1))
    print("\nloss curve (step: loss / mse / dfc):")
    for step, values in curve.items():
        print(f"  {step:2d}: {values['loss']:.4f} / {values['mse']:.4f} / {values['dfc']:.4f}")
    print(next(line for line in done.stdout.splitlines() if line.startswith("compiled")))
    loss = np.array([curve[s]["loss"] for s in sorted(curve)])
    third = TOTAL_STEPS // 3
    assert loss[-third:].mean() < loss[:third].mean() * 0.97, loss
    # the start-up summary, and the scalars TensorBoard sees
    for text in ("devices: 4 x cpu", "mesh: {'data': 4, 'fsdp': 1}", "global batch: 4",
                 "trainable", "frozen", "hr_target", "compiled the train step"):
        assert text in done.stdout, (text, done.stdout)
    scalars = read_scalars(workdir / "tensorboard")
    assert set(scalars) >= {"loss", "mse", "dfc", "learning_rate", "grad_norm",
                            "images_per_second"}
    assert scalars["loss"] == {s: pytest.approx(v["loss"], rel=1e-6) for s, v in curve.items()}
    record = metrics_lib.read_metrics_jsonl(workdir / "metrics.jsonl")[0]
    assert {"dfc_rgb_0", "dfc_latent_0", "dfc_latent_mid", "learning_rate",
            "images_per_second"} <= set(record)
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["pipeline"]["tokenizer_path"].endswith("tokenizer")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [9, 12]


def test_validation_writes_an_lr_sr_hr_grid_of_the_current_weights(reference_run):
    from xpsr_jax.data import images as image_io

    workdir, done = reference_run
    grids = sorted((workdir / "validation").glob("step_*.png"))
    assert [p.name for p in grids] == [f"step_{s:08d}.png" for s in range(VALIDATE_EVERY, TOTAL_STEPS + 1,
                                                                          VALIDATE_EVERY)]
    first, last = (image_io.read_rgb(p) for p in grids)
    assert first.shape == last.shape == (64, 3 * 64, 3)  # LR (upscaled) | SR | HR, one row
    hr = image_io.read_rgb(Path(str(workdir.parent / "validation_images" / "HR" / "val_0.png")))
    np.testing.assert_array_equal(first[:, 128:], hr)
    np.testing.assert_array_equal(first[:, :64], last[:, :64])  # the same LR
    assert np.abs(first[:, 64:128].astype(int) - last[:, 64:128]).mean() > 0.5  # weights moved
    assert f"validation grid of step {VALIDATE_EVERY}" in done.stdout


@pytest.mark.slow
def test_sigterm_and_sigkill_then_the_same_command_resume_step_for_step(setup, reference_run,
                                                                        tmp_path):
    reference = losses(reference_run[0])
    workdir = tmp_path / "run"
    flags = (*RUN_FLAGS, "--config.pipeline.batch_size=4")
    stopped = run_and_signal(setup, workdir, *flags, after_step=2, signal_number=signal.SIGTERM)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stdout
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert saved and saved[-1] < TOTAL_STEPS  # saved where it stopped, not at a cadence step only

    killed = run_and_signal(setup, workdir, *flags, after_step=saved[-1] + 4,
                            signal_number=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert f"steps: {saved[-1]} -> {TOTAL_STEPS} (resumed)" in killed.stdout
    # as if the kill had hit a save: orbax's temporary folder of a later step, half written
    partial = workdir / "checkpoints" / f"{TOTAL_STEPS - 1}.orbax-checkpoint-tmp-99"
    (partial / "state").mkdir(parents=True)

    finished = run_train(setup, workdir, *flags)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "(resumed)" in finished.stdout
    resumed = losses(workdir)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        for key in LOSS_KEYS:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), \
                (step, key)


@pytest.mark.slow
def test_two_processes_match_one_process_and_their_checkpoint_restores_in_one(setup,
                                                                              reference_run,
                                                                              tmp_path):
    reference = losses(reference_run[0])
    workdir = tmp_path / "run"
    two_steps = 6
    results = run_two_processes(setup, workdir, *RUN_FLAGS, f"--config.total_steps={two_steps}",
                                "--config.pipeline.batch_size=2")
    for process_id, done in enumerate(results):
        assert done.returncode == 0, (process_id, done.stderr[-3000:])
    assert "2 process(es), 2 local" in results[0].stdout and "global batch: 4" in results[0].stdout
    assert "process 0 of 2" in results[0].stdout
    # only process 0 logs (gloo itself prints a connection line in each process)
    assert [line for line in results[1].stdout.splitlines()
            if line.strip() and "Gloo" not in line and "peer ranks" not in line] == []
    assert "train:" not in results[1].stderr  # and shows a progress bar
    assert len(list(workdir.glob("metrics*.jsonl"))) == 1
    two = losses(workdir)
    assert sorted(two) == list(range(1, two_steps + 1))

    # The same workdir continues in one process with 4 devices (batch 4 per process).
    one = run_train(setup, workdir, *RUN_FLAGS, "--config.pipeline.batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"steps: {two_steps} -> {TOTAL_STEPS} (resumed)" in one.stdout
    continued = losses(workdir)
    assert sorted(continued) == sorted(reference)
    for step in reference:
        for key in LOSS_KEYS:
            assert continued[step][key] == pytest.approx(reference[step][key], rel=2e-4), \
                (step, key)




@pytest.mark.slow
def test_sigterm_to_every_process_of_a_run_saves_one_step_together(setup, tmp_path):
    """A pod's maintenance event: every host gets SIGTERM, each at its own moment. The processes
    agree on one step (a collective after each step), all save it and stop (resuming a checkpoint
    written by two processes is `test_two_processes_match_one_process...`'s)."""
    workdir = tmp_path / "run"
    flags = (*RUN_FLAGS, "--config.pipeline.batch_size=2", "--config.checkpoint_every=1000")
    stopped = run_two_processes(setup, workdir, *flags, signal_after_step=2, signal_gap=0.5)
    for process_id, done in enumerate(stopped):
        assert done.returncode == 0, (process_id, done.stderr[-3000:])
    line = next(line for line in stopped[0].stdout.splitlines() if "stopped by SIGTERM at step" in line)
    steps = int(line.split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [steps] and 2 <= steps < TOTAL_STEPS  # one checkpoint, where they stopped together
    assert read_checkpoint_meta(workdir / "checkpoints", steps)["step"] == steps
    assert sorted(losses(workdir)) == list(range(1, steps + 1))  # no step after the agreed one
