"""Helpers of tests/test_train_cli.py: a tiny model + TFDS dataset, and train.py subprocesses.

Every subprocess shares one persistent JAX compilation cache (`cache_dir`), so only the first
run of each program shape pays for XLA compilation.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tests.helpers.data_fixtures import write_prepared_work_dir

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


class TinySetup(NamedTuple):
    sd15: Path  # diffusers SD 1.5 folder (xpsr_jax.models.tiny)
    xpsr: Path  # its XPSR release folder
    data_dir: Path  # TFDS data_dir with xpsr_pairs/prepared
    cache_dir: Path  # shared JAX compilation cache


def build_tiny_setup(root: Path, *, examples: int = 8, hr_size: int = 96) -> TinySetup:
    """The tiny model with one layer per UNet block (SD 1.5 has two): the loop tests are about
    the loop, and XLA's CPU compile of the whole train step is what dominates their time."""
    from unittest import mock

    from xpsr_jax.data import tfds_builder
    from xpsr_jax.models import tiny

    with mock.patch.dict(tiny.UNET_CONFIG, {"layers_per_block": 1}):
        paths = tiny.write_tiny_model(root / "model", seed=0)
    write_prepared_work_dir(root / "work", count=examples, hr_size=hr_size)
    tfds_builder.build_dataset(config_name="prepared", source_dir=root / "work",
                               data_dir=root / "tfds")
    # XPSR_TEST_COMPILE_CACHE: a cache folder kept between pytest runs (a rerun of the end-to-end
    # file then skips the train-step compiles of the last one).
    cache = Path(os.environ.get("XPSR_TEST_COMPILE_CACHE") or root / "jax_cache")
    cache.mkdir(parents=True, exist_ok=True)
    return TinySetup(paths.sd15, paths.xpsr, root / "tfds", cache)


def write_validation_images(root: Path, count: int = 1, lr_size: int = 16) -> Path:
    """The official validation layout: root/LR/*.png, root/HR/ (4x), prompts; returns root/LR."""
    import numpy as np

    from xpsr_jax.data import images as image_io

    rng = np.random.default_rng(0)
    for index in range(count):
        name = f"val_{index}"
        hr = rng.integers(0, 256, (4 * lr_size, 4 * lr_size, 3), dtype=np.uint8)
        lr = hr.reshape(lr_size, 4, lr_size, 4, 3).mean(axis=(1, 3)).astype(np.uint8)
        image_io.write_png_atomic(root / "LR" / f"{name}.png", lr)
        image_io.write_png_atomic(root / "HR" / f"{name}.png", hr)
        for folder, text in (("highlevel_prompt", "a photo of a cat"), ("lowlevel_prompt", "blurry, noisy")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{name}.txt").write_text(text + "\n")
    return root / "LR"


def tiny_config(setup: TinySetup, **overrides):
    """configs/train.py:tiny on `setup`; overrides by dotted key ("optimizer.learning_rate")."""
    from xpsr_jax.configs import train as train_configs

    config = train_configs.get_config("tiny")
    config.base_model = str(setup.sd15)
    config.pipeline.data_dir = str(setup.data_dir)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_env(setup: TinySetup, device_count: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(setup.cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def train_command(setup: TinySetup, workdir: Path, *overrides: str, variants: str = "tiny") -> list[str]:
    return [PYTHON, str(REPO / "train.py"), "--config", f"{REPO / 'configs' / 'train.py'}:{variants}",
            "--workdir", str(workdir), f"--config.base_model={setup.sd15}",
            f"--config.pipeline.data_dir={setup.data_dir}", *overrides]


class Finished(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_train(setup: TinySetup, workdir: Path, *overrides: str, device_count: int = 4,
              extra_args: tuple[str, ...] = (), timeout: float = 3600, variants: str = "tiny") -> Finished:
    done = subprocess.run(train_command(setup, workdir, *overrides, variants=variants) + list(extra_args),
                          env=train_env(setup, device_count), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return Finished(done.returncode, done.stdout, done.stderr)


def logged_steps(workdir: Path) -> int:
    from xpsr_jax.training.metrics import read_metrics_jsonl

    records = read_metrics_jsonl(workdir / "metrics.jsonl")
    return max((r["step"] for r in records), default=0)


def run_and_signal(setup: TinySetup, workdir: Path, *overrides: str, after_step: int,
                   signal_number: int, device_count: int = 4, timeout: float = 3600,
                   variants: str = "tiny") -> Finished:
    """Starts train.py and sends `signal_number` once metrics.jsonl shows `after_step`."""
    process = subprocess.Popen(train_command(setup, workdir, *overrides, variants=variants),
                               env=train_env(setup, device_count), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        while logged_steps(workdir) < after_step:
            if process.poll() is not None:
                out, err = process.communicate()
                raise AssertionError(f"train.py ended before step {after_step}:\n{out}\n{err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"train.py did not reach step {after_step} in {timeout} s")
            time.sleep(0.05)
        process.send_signal(signal_number)
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return Finished(process.returncode, out, err)


def run_two_processes(setup: TinySetup, workdir: Path, *overrides: str, timeout: float = 3600,
                      signal_after_step: int | None = None, signal_gap: float = 0.3) -> list[Finished]:
    """Two train.py processes on localhost (2 simulated CPU devices each, gloo collectives).
    `signal_after_step`: once metrics.jsonl shows that step, SIGTERM to process 0, then
    `signal_gap` seconds later to process 1 (as a pod's hosts get a maintenance event)."""
    port = free_port()
    processes = []
    for process_id in range(2):
        command = train_command(setup, workdir, *overrides) + [
            f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2",
            f"--process-id={process_id}"]
        processes.append(subprocess.Popen(command, env=train_env(setup, 2), cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    results = []
    try:
        if signal_after_step is not None:
            deadline = time.monotonic() + timeout
            while logged_steps(workdir) < signal_after_step:
                ended = [process for process in processes if process.poll() is not None]
                if ended or time.monotonic() > deadline:
                    reports = "\n".join(f"process {processes.index(process)} exit {process.returncode}:\n"
                                        f"{process.communicate()[1][-3000:]}" for process in ended)
                    raise AssertionError(f"the processes ended or stalled before step "
                                         f"{signal_after_step}\n{reports}")
                time.sleep(0.05)
            for process in processes:
                process.send_signal(signal.SIGTERM)
                time.sleep(signal_gap)
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append(Finished(process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    return results
