"""The package as `pip install .` makes it (a wheel, not an editable install), used from an empty
directory outside the repository: the packaged configs and sample images are found, and the
quickstart chain runs (the tiny model writer, data preparation, 2 training steps of the packaged
`train.py:tiny` config, export, inference with the packaged `infer.py:tiny`, evaluation).

The chain compiles the tiny train step (a few minutes on a 2-core CPU); it is the one test that
proves nothing reads the repository's `configs/` or `examples/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_runs_the_chain_from_an_empty_directory(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("xpsr_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("xpsr_jax/configs/train.py", "xpsr_jax/configs/infer.py", "xpsr_jax/configs/data.py",
                     "xpsr_jax/examples/captions.jsonl", "xpsr_jax/examples/hr/astronaut.png"):
        assert packaged in names, f"{packaged} is not in the wheel"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # Only the installed copy is importable: no repository on the path, an empty working directory.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_COMPILATION_CACHE_DIR")}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    where = subprocess.run([sys.executable, "-c", "import xpsr_jax; print(xpsr_jax.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site)), where.stdout

    help_text = subprocess.run([sys.executable, "-m", "xpsr_jax.train", "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0 and "optimizer.{" in help_text.stdout, help_text.stdout + help_text.stderr
    done = subprocess.run([sys.executable, "-m", "xpsr_jax.quickstart", "--workdir", str(tmp_path / "run"),
                           "--steps", "2"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "quickstart.json").read_text())
    stages = state["stages"]
    assert stages["train"]["result"]["steps"] == 2 and stages["infer"]["result"]["images"] == 4, stages
    assert "$ python -m xpsr_jax.train --config configs/train.py:tiny" in done.stdout
    assert not list(elsewhere.iterdir()), "the commands wrote into the working directory"
