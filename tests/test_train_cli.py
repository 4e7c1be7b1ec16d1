"""The training loop and CLI (train.py) without compiling a train step: metrics files, data
position, checkpoint atomicity, config errors, the non-finite stop, on the tiny model. The runs
that compile (loss curve, SIGTERM / SIGKILL resume, two processes) are in
tests/end_to_end/test_train.py.

The subprocess runs share one tiny model, one tiny TFDS dataset and one JAX compilation cache
(module fixture), so the 1-process runs after the first load their program from the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.tensorboard_events import read_events, read_scalars
from tests.helpers.train_cli_fixtures import REPO, build_tiny_setup, tiny_config
from xpsr_jax.training import checkpoint as checkpoint_lib
from xpsr_jax.training import config as train_config
from xpsr_jax.training import metrics as metrics_lib


TOTAL_STEPS = 12
LOSS_KEYS = ("loss", "mse", "dfc", "grad_norm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("train_cli"))


def losses(workdir: Path) -> dict[int, dict[str, float]]:
    records = metrics_lib.read_metrics_jsonl(workdir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in records}


# ----------------------------------------------------------------------------- TensorBoard


def test_event_files_and_metrics_jsonl_round_trip_and_resume(tmp_path):
    writer = metrics_lib.MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "grad_norm": 2.0 * step})
    writer.close()
    # A run resumed from step 1 rewrites steps 2 and 3; TensorBoard must drop the old ones.
    writer = metrics_lib.MetricsWriter(tmp_path, resumed_step=1)
    writer.write(2, {"loss": 0.75, "grad_norm": -1.5})
    writer.close()

    records = metrics_lib.read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.75)]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == {1: 1.0, 2: 0.75}
    assert scalars["grad_norm"] == {1: 2.0, 2: -1.5}

    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    first = read_events(files[0])
    assert first[0].file_version == "brain.Event:2"
    logged = [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in first[1:]]
    assert logged == [(1, [("loss", 1.0)]), (1, [("grad_norm", 2.0)]), (2, [("loss", 0.5)]),
                      (2, [("grad_norm", 4.0)]), (3, [("loss", pytest.approx(1 / 3))]), (3, [("grad_norm", 6.0)])]
    resumed = read_events(files[1])
    starts = [e for e in resumed if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in starts] == [(2, 1)]  # START purges >= 2

    # A flipped payload byte is caught by the record CRC.
    data = bytearray(files[0].read_bytes())
    data[20] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_events(files[0])


# ----------------------------------------------------------------------------- data position


def test_global_batches_do_not_depend_on_process_count_or_restart(setup):
    from xpsr_jax.data.pipeline import make_train_iterator

    config = tiny_config(setup).pipeline
    config.unlock()
    config.tokenizer_path = str(setup.sd15 / "tokenizer")
    config.include_image_id = True

    def global_batches(process_count, start_index=0, steps=3):
        local = config.batch_size = 4 // process_count
        iterators = [make_train_iterator(config, process_index=p, process_count=process_count,
                                         start_index=start_index) for p in range(process_count)]
        batches = []
        for _ in range(steps):
            parts = [next(iterator) for iterator in iterators]
            assert all(len(part["image_id"]) == local for part in parts)
            batches.append({key: np.concatenate([part[key] for part in parts])
                            for key in ("image_id", "pixel_values", "lowlevel_input_ids")})
        return batches

    one, two = global_batches(1), global_batches(2)
    resumed = global_batches(2, start_index=4, steps=2)  # resume after one step of 4 examples
    for got, want in zip(two + resumed, one + one[1:]):
        assert list(got["image_id"]) == list(want["image_id"])
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
        np.testing.assert_array_equal(got["lowlevel_input_ids"], want["lowlevel_input_ids"])
    # the two processes read disjoint halves of each global batch (their own share only)
    assert not set(two[0]["image_id"][:2]) & set(two[0]["image_id"][2:])
    assert list(one[0]["image_id"]) != list(one[1]["image_id"])


# ----------------------------------------------------------------------------- checkpoints


def test_a_save_cut_short_leaves_the_previous_checkpoint_usable(tmp_path):
    import jax
    import jax.numpy as jnp

    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(2),
             "rng": jax.random.key_data(jax.random.key(3))}
    checkpoints = checkpoint_lib.TrainCheckpoints(tmp_path, keep=2)
    checkpoints.save(2, state, {"step": 2, "data_position": 8})
    checkpoints.save(4, jax.tree.map(lambda x: x + 1, state), {"step": 4, "data_position": 16})
    checkpoints.close()
    # What a kill during the save of step 6 leaves: orbax's temporary folder, half written.
    partial = tmp_path / "6.orbax-checkpoint-tmp-1234567890"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)

    reopened = checkpoint_lib.TrainCheckpoints(tmp_path, keep=2)
    assert reopened.latest_step() == 4
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored, meta = reopened.restore(4, abstract)
    reopened.close()
    assert not partial.exists()  # cleaned up (in the background) when the manager opens
    assert meta == {"step": 4, "data_position": 16}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(6.0).reshape(2, 3) + 1)
    assert int(restored["step"]) == 3


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if train() gets as far as loading models or compiling."""
    from xpsr_jax.training import loop

    def forbidden(*args, **kwargs):
        raise AssertionError("bad input must be reported before models are loaded or compiled")

    # The loop's own references: what train() calls.
    monkeypatch.setattr(loop, "load_training_models", forbidden)
    monkeypatch.setattr(loop, "load_one_step_networks", forbidden)
    monkeypatch.setattr(loop, "make_train_step", forbidden)


def _one_line_error(capsys, argv) -> str:
    from xpsr_jax.train import main

    assert main(["train.py", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line_before_compilation(setup, tmp_path, capsys, no_model_loading):
    base = ["--config", f"{REPO / 'configs' / 'train.py'}:tiny", "--workdir", str(tmp_path / "w"),
            f"--config.base_model={setup.sd15}", f"--config.pipeline.data_dir={setup.data_dir}"]
    err = _one_line_error(capsys, [*base, "--config.optimizer.lr=1e-4"])
    assert "--config.optimizer.lr" in err and "'optimizer.lr'" in err and "learning_rate" in err
    err = _one_line_error(capsys, ["--config", f"{REPO / 'configs' / 'train.py'}:huge",
                                   "--workdir", "w"])
    assert "'huge'" in err and "tiny" in err
    err = _one_line_error(capsys, [*base, "--config.optimizer.schedule=linear"])
    assert "optimizer.schedule='linear'" in err and "constant | cosine" in err
    err = _one_line_error(capsys, [*base, f"--config.pipeline.data_dir={tmp_path / 'nothing'}"])
    assert "pipeline.data_dir=" in err and "no such folder" in err
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    err = _one_line_error(capsys, [*base, f"--config.pipeline.data_dir={empty}"])
    assert "'xpsr_pairs/prepared' is not built" in err

    broken = tmp_path / "sd15_without_scheduler"
    shutil.copytree(setup.sd15, broken)
    shutil.rmtree(broken / "scheduler")
    err = _one_line_error(capsys, [*base, f"--config.base_model={broken}"])
    assert f"base_model='{broken}'" in err and "missing scheduler/scheduler_config.json" in err

    # A workdir written by another architecture.
    workdir = tmp_path / "w"
    config = train_config.resolve_train_config(tiny_config(setup))
    train_config.write_workdir_config(config, workdir)
    err = _one_line_error(capsys, [*base, "--config.model.mid_use_lowlevel_prompt=True"])
    assert "incompatible config: model.mid_use_lowlevel_prompt=True here but False" in err

    # A checkpoint trained on other base weights: same folder name, different bytes.
    other = tmp_path / "other_sd15"
    shutil.copytree(setup.sd15, other)
    reference = train_config.frozen_base_reference(train_config.resolve_train_config(
        tiny_config(setup, base_model=str(other))))
    weights = next((other / "vae").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    import jax.numpy as jnp

    checkpoints = checkpoint_lib.TrainCheckpoints(workdir / "checkpoints", keep=1)
    checkpoints.save(5, {"x": jnp.zeros(2)}, {"step": 5, "frozen_base": reference})
    checkpoints.close()
    err = _one_line_error(capsys, [*base, f"--config.base_model={other}"])
    assert "base_model weights do not match the checkpoint" in err and str(other) in err


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path,
                                                                            monkeypatch):
    """The loop's handling, with the networks and the compiled step replaced by fakes."""
    import jax
    import jax.numpy as jnp

    from xpsr_jax.training import loop, step as step_lib

    def fake_state(*args, **kwargs):
        state = step_lib.TrainState(step=jnp.zeros((), jnp.int32),
                                    params={"unet": {"w": jnp.ones(3)}},
                                    opt_state={"mu": jnp.zeros(3)},
                                    rng=jax.random.key_data(jax.random.key(0)))
        return state, {"vae": {"v": jnp.ones(2)}}, {}

    class FakeStep:
        compile_seconds, flops, lower_seconds, cache = 0.0, None, 0.0, "compiled"

        def __call__(self, state, frozen, batch):
            bad = state.step + 1 == 5  # the 5th step's loss is NaN
            loss = jnp.where(bad, jnp.nan, 1.0 / (state.step + 1.0))
            metrics = {"loss": loss, "mse": loss, "dfc": loss * 0, "grad_norm": loss,
                       "learning_rate": jnp.float32(1e-3), "is_finite": ~bad}
            params = jax.tree.map(lambda w: w + 1, state.params)
            return state.replace(step=state.step + 1, params=params), metrics

    monkeypatch.setattr(loop, "load_training_models", lambda *a, **k: None)
    monkeypatch.setattr(loop, "create_train_state", fake_state)
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: FakeStep())
    config = tiny_config(setup, total_steps=8, checkpoint_every=2)
    with pytest.raises(loop.TrainingDiverged) as raised:
        loop.train(config, tmp_path / "run")
    message = str(raised.value)
    assert "non-finite loss or gradient at step 5" in message
    assert "the last good checkpoint is step 4" in message and "\n" not in message
    assert checkpoint_lib.finalized_steps(tmp_path / "run" / "checkpoints") == [2, 4]
    assert [r["step"] for r in metrics_lib.read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl")] \
        == [1, 2, 3, 4]


def test_bad_one_step_input_is_one_line_before_compilation(setup, tmp_path, capsys, no_model_loading):
    """configs/train.py:one_step: the LPIPS trunk file, the release, the recipe keys and what the
    objective does not support are named before any model loads."""
    base = ["--config", f"{REPO / 'configs' / 'train.py'}:tiny,one_step", "--workdir", str(tmp_path / "w"),
            f"--config.base_model={setup.sd15}", f"--config.pipeline.data_dir={setup.data_dir}"]
    err = _one_line_error(capsys, base)
    assert "loss.lpips_backbone=''" in err and "vgg16-397923af.pth" in err
    backbone = tmp_path / "vgg16.pth"
    backbone.write_bytes(b"x")
    base.append(f"--config.loss.lpips_backbone={backbone}")
    for flag, expected in (("--config.one_step.lora_rank=0", "one_step.lora_rank=0"),
                           ("--config.one_step.cfg_vsd=nan", "one_step.cfg_vsd=nan"),
                           ("--config.validation.every=5", "validation.every=5"),
                           ("--config.objective=two_step", "objective='two_step'"),
                           (f"--config.one_step.init_from={tmp_path / 'no_release'}", "no_release")):
        err = _one_line_error(capsys, [*base, flag])
        assert expected in err, (flag, err)
    err = _one_line_error(capsys, [*base, f"--config.one_step.init_from={setup.xpsr}",
                                   f"--config.init_from={setup.sd15}"])
    assert "one_step.init_from=" in err and "differ" in err
    # one_step.init_from is the run's init_from (the frozen base checked on resume, export's base)
    config = tiny_config(setup, objective="one_step", **{"one_step.init_from": str(setup.xpsr)})
    assert train_config.resolve_train_config(config).init_from == str(setup.xpsr)
    # a workdir of a multi-step run does not resume as a one-step one
    train_config.write_workdir_config(train_config.resolve_train_config(tiny_config(setup)), tmp_path / "w")
    err = _one_line_error(capsys, base)
    assert "incompatible config: objective='one_step' here but 'xpsr'" in err


@pytest.mark.parametrize("key, value", [("loss.dfc_weight", "inf"), ("optimizer.learning_rate", "nan"),
                                        ("optimizer.weight_decay", "nan"), ("optimizer.grad_clip_norm", "inf")])
def test_non_finite_training_numbers_are_refused_by_name(setup, tmp_path, capsys, no_model_loading, key, value):
    base = ["--config", f"{REPO / 'configs' / 'train.py'}:tiny", "--workdir", str(tmp_path / "w"),
            f"--config.base_model={setup.sd15}", f"--config.pipeline.data_dir={setup.data_dir}"]
    err = _one_line_error(capsys, [*base, f"--config.{key}={value}"])
    assert f"{key}={value}" in err and "finite" in err, err


def _compile_line(output: str) -> tuple[float, str]:
    import re

    match = re.search(r"compiled the train step in ([0-9.]+) s \(tracing and lowering [0-9.]+ s, XLA [0-9.]+ s, "
                      r"([^)]*)\)", output)
    assert match, output[-3000:]
    return float(match.group(1)), match.group(2)


def test_a_rerun_in_the_same_workdir_reads_the_compiled_step_from_the_cache(setup, tmp_path):
    """compile_cache "default": WORKDIR/compile_cache, so the run that resumes finds the step."""
    import subprocess

    from tests.helpers.train_cli_fixtures import train_command, train_env

    env = train_env(setup, device_count=1)
    for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        env.pop(key, None)  # the command's own default, as a user runs it
    workdir = tmp_path / "run"

    def run(steps: int):
        done = subprocess.run(train_command(setup, workdir, f"--config.total_steps={steps}",
                                            "--config.checkpoint_every=1"),
                              env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"compile cache: {workdir / 'compile_cache'}" in done.stdout, done.stdout[-3000:]
        return _compile_line(done.stdout)

    first_seconds, first = run(1)
    second_seconds, second = run(2)  # resumes at step 1
    print(f"train step: {first_seconds:.1f} s {first}, then {second_seconds:.1f} s {second}")
    assert first == "compiled" and second == "from the compile cache", (first, second)
    assert second_seconds < first_seconds, (first_seconds, second_seconds)
    assert any((workdir / "compile_cache").iterdir())
