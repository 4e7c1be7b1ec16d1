"""Export after a real training run: an official release used as `init_from`, trained for 2 steps
at learning rate 0 and exported to the torch layout, gives back the release's bytes and
config.json keys. Compiles the train step (about a minute on a 2-core CPU).

    python -m pytest tests/end_to_end/test_export.py -q -s
"""

from __future__ import annotations

import json
import time

import pytest

from tests.test_export import (MANIFEST, NETWORKS, WEIGHTS, assert_no_output, assert_same_tensors,  # noqa: F401
                         release_tensors, run_cli, setup, tiny_config)

pytestmark = pytest.mark.end_to_end


def test_init_from_release_trained_with_zero_learning_rate_exports_the_same_bytes(setup, tmp_path, capsys):  # noqa: F811
    from xpsr_jax.training.loop import train

    config = tiny_config(setup, total_steps=2, checkpoint_every=2, **{"optimizer.learning_rate": 0.0})
    start = time.perf_counter()
    result = train(config, tmp_path / "run")
    seconds = time.perf_counter() - start
    print(f"2 training steps with lr 0: {seconds:.1f} s (compile {result.compile_seconds:.1f} s)")
    assert result.final_step == 2
    code, err = run_cli(capsys, "torch", "--workdir", tmp_path / "run", "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["step"] == 2
    assert_same_tensors(release_tensors(tmp_path / "out"), release_tensors(setup.xpsr))
    for name in NETWORKS:
        ours = json.loads((tmp_path / "out" / name / "config.json").read_text())
        theirs = json.loads((setup.xpsr / name / "config.json").read_text())
        assert list(ours) == list(theirs) and ours == theirs
        assert (tmp_path / "out" / name / WEIGHTS).read_bytes() == (setup.xpsr / name / WEIGHTS).read_bytes()
    # That run kept no EMA: asking for it is an error naming the checkpoint.
    code, err = run_cli(capsys, "torch", "--workdir", tmp_path / "run", "--ema", "--out", tmp_path / "ema")
    assert code == 2 and "has no EMA weights" in err and str(tmp_path / "run" / "checkpoints" / "2") in err
    assert_no_output(tmp_path / "ema")
