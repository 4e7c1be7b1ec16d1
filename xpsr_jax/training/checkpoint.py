"""Training checkpoints with orbax: async, keep-last-N, atomic; plus the SIGTERM stop flag.

    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=3)
    step = checkpoints.latest_step()                      # None: a new run
    state, meta = checkpoints.restore(step, abstract_state)
    checkpoints.save(step, state, meta)                   # returns at once; written in background
    checkpoints.close()                                   # waits for the last save

Each checkpoint `<step>/` holds two items: `state` (the train-state pytree: trainable params,
optimizer state, step, RNG key data; sharded arrays written by every process) and `meta`
(JSON: step, the global data position, the resolved config, the frozen-base reference).
orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
crash during a save leaves the previous checkpoints intact; `latest_step` ignores temporary
folders and they are removed when the manager opens.

The data position is the GLOBAL number of examples consumed (steps x global batch), not
grain's per-process iterator state, so a run resumes with a different number of processes
(`xpsr_jax.data.pipeline.make_train_iterator(..., start_index=position)`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class _QuietWaitingForSave(logging.Filter):
    """orbax warns "Waiting for previous save to complete took N seconds" before nearly every
    save when checkpoints come often (the tiny runs); the wait is expected, the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save")


_QUIET_WAITING = _QuietWaitingForSave()


def storage_path(path: str | os.PathLike) -> epath.Path:
    """A folder that may be local or in a bucket (`gs://...`): an epath (what orbax and
    tensorstore take), absolute when local. Every operation on checkpoint folders goes through it,
    so none is local-only."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def checkpoint_directory(workdir: str | os.PathLike, checkpoint_dir: str = "") -> epath.Path:
    """Where a run's checkpoints are: `checkpoint_dir` (e.g. gs://bucket/run/checkpoints) when
    given, else WORKDIR/checkpoints."""
    return storage_path(checkpoint_dir) if checkpoint_dir else storage_path(workdir) / CHECKPOINT_DIR


def finalized_steps(directory: str | os.PathLike) -> list[int]:
    """Steps with a finished checkpoint in `directory`, read from the file system alone (no
    orbax manager, so no cross-process barrier): orbax renames `<step>.orbax-checkpoint-tmp-*`
    to `<step>` only once every item is written, and marks it with `commit_success.txt`."""
    directory = storage_path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()
                  and ((p / "commit_success.txt").exists()
                       or (p / "_CHECKPOINT_METADATA").exists()))


def read_checkpoint_meta(directory: str | os.PathLike, step: int) -> dict:
    """The `meta` item of checkpoint `step` (orbax's JsonSave layout: meta/metadata)."""
    path = storage_path(directory) / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {storage_path(directory) / str(step)}: cannot read {path} "
                         f"({error})") from error


def restore_saved_params(checkpoint: str | os.PathLike, shapes: dict, *, ema: bool, param_dtype) -> dict:
    """From one checkpoint step folder, only its state's `params` (or `ema_params`) named in
    `shapes` (trees whose leaves have a shape), in `param_dtype` on the first local device: no
    optimizer state, RNG or step is read. ValueError / KeyError / TypeError when they do not fit."""
    key = "ema_params" if ema else "params"
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = {key: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype, sharding=sharding), shapes)}
    return ocp.PyTreeCheckpointer().restore(storage_path(checkpoint) / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))[key]


class TrainCheckpoints:
    """orbax CheckpointManager over `directory` with a `state` (pytree) and a `meta` (JSON) item."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
        self.directory = storage_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # a save cut short by a crash leaves only a tmp dir
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        absl_logger = logging.getLogger("absl")  # orbax logs through absl
        if _QUIET_WAITING not in absl_logger.filters:
            absl_logger.addFilter(_QUIET_WAITING)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an async save of `state` and `meta` at `step` (every process must call it)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of `step`; `abstract_state` gives shapes, dtypes and shardings
        (jax.ShapeDtypeStruct leaves), so the arrays come back sharded as this run wants."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopSignal:
    """Sets `requested` on SIGTERM (and SIGINT) so the loop can save and stop between steps.

    orbax's own preemption sync point needs jax.distributed; this works for one process too.
    The previous handlers come back with `restore()`.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in signals:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, _frame) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        self.signal_name = signal.Signals(number).name
        logger.warning("%s received: saving a checkpoint after this step, then stopping",
                       self.signal_name)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
