"""The package as `pip install .` makes it (a wheel, not an editable install), used from an empty
directory outside the repository: the README's "Try each command on a CPU" lines run as written
(the tiny model writer, the sample test set, inference, evaluation, data preparation, training
with the packaged `train.py:tiny`, export), with /tmp/xpsr-try moved into the test's folder.

The block compiles the tiny train step and the sampler (minutes on a 2-core CPU); it is the one
test that proves nothing reads the repository's `configs/` or `examples/`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MARKER = "<!-- commands run by tests/test_installed_package.py -->"
README_FOLDER = "/tmp/xpsr-try"


def readme_commands() -> list[list[str]]:
    """The marked bash block of README.md, one argv per line (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split(README_MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [argv for argv in commands if argv]


def test_the_readme_commands_run_from_an_empty_directory_after_pip_install(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("xpsr_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("xpsr_jax/configs/train.py", "xpsr_jax/configs/infer.py", "xpsr_jax/configs/data.py",
                     "xpsr_jax/examples/captions.jsonl", "xpsr_jax/examples/hr/astronaut.png",
                     "xpsr_jax/examples/__main__.py"):
        assert packaged in names, f"{packaged} is not in the wheel"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # Only the installed copy is importable: no repository on the path, an empty working directory.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_COMPILATION_CACHE_DIR")}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "cache"))
    where = subprocess.run([sys.executable, "-c", "import xpsr_jax; print(xpsr_jax.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site)), where.stdout

    help_text = subprocess.run([sys.executable, "-m", "xpsr_jax.train", "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0 and "optimizer.{" in help_text.stdout, help_text.stdout + help_text.stderr

    commands = readme_commands()
    assert [argv[:3] for argv in commands][:3] == [["python", "-m", "xpsr_jax.models.tiny"],
                                                   ["python", "-m", "xpsr_jax.examples"],
                                                   ["python", "-m", "xpsr_jax.infer"]], commands
    try_folder = tmp_path / "try"
    for argv in commands:
        assert argv[0] == "python", argv
        argv = [sys.executable] + [arg.replace(README_FOLDER, str(try_folder)) for arg in argv[1:]]
        done = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, (argv, done.stdout[-3000:] + done.stderr[-3000:])
        assert "\r" not in done.stderr and "PyTorch was not found" not in done.stderr, done.stderr[-2000:]

    assert sorted(p.name for p in (try_folder / "sr").glob("*.png")) == [
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    means = json.loads((try_folder / "eval" / "means.json").read_text())
    assert means["num_images"] == 4
    steps = [json.loads(line)["step"] for line in (try_folder / "run" / "metrics.jsonl").read_text().splitlines()
             if line.strip() and "loss" in json.loads(line)]
    assert max(steps) == 20, steps
    assert (try_folder / "release" / "controlnet").is_dir() and (try_folder / "release" / "unet").is_dir()
    assert not list(elsewhere.iterdir()), "the commands wrote into the working directory"
