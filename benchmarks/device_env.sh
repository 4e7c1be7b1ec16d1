#!/usr/bin/env bash
# The GPU machine's Python environment, rebuilt on this CPU machine, so a device run works the first
# time: a Python 3.12 venv with the GPU machine's versions (CPU wheels), the wheels gpu_check.sh
# ships in .whl/ (downloaded here if absent), and `gpu_check.sh --dry-run` run inside it.
#
#   bash benchmarks/device_env.sh [VENV] [OUTDIR]   # default /tmp/xpsr-device-env, /tmp/device_env_dry
#
# The GPU machine (see benchmarks/README.md, "GPU check") has Python 3.12 with jax/jaxlib 0.11.2
# (CUDA 13 plugin), torch 2.11.0, transformers 5.17.0, numpy 2.5.2, safetensors 0.8.0,
# huggingface-hub 1.33.0, and its own flax, optax and orbax-checkpoint (unknown versions: here the
# newest that install beside jax 0.11.2). It lacks diffusers, ml-collections and
# importlib-metadata: those travel as wheels. torch comes from PyPI (its CUDA build: no CPU index
# is reachable here; it runs on the CPU all the same). Needs python3.12 (pyenv's is found too).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/xpsr-device-env}
OUTDIR=${2:-/tmp/device_env_dry}
PINS=(jax==0.11.2 jaxlib==0.11.2 torch==2.11.0 transformers==5.17.0 numpy==2.5.2 safetensors==0.8.0
      huggingface-hub==1.33.0 flax optax orbax-checkpoint scipy pillow pytest pyyaml absl-py regex requests
      filelock zipp)
WHEELS=(diffusers==0.42.1 ml-collections==1.1.0 importlib-metadata==10.2.0)

PY=$(command -v python3.12 2>/dev/null || true)
if [ -z "$PY" ] || ! "$PY" -V >/dev/null 2>&1; then
  PY=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
fi
[ -n "$PY" ] || { echo "device_env.sh: no python3.12 found (install one, or pyenv install 3.12)" >&2; exit 2; }

if [ ! -x "$VENV/bin/python3" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python3" -m pip install -q "${PINS[@]}"

mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; version=${spec##*==}
  if ! ls .whl/"${name//-/_}"-"$version"-*.whl >/dev/null 2>&1; then
    "$VENV/bin/python3" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 -d .whl "$spec"
  fi
done
du -ch .whl/*.whl | tail -1 | sed 's/^/wheels that travel: /'

echo "versions: $("$VENV/bin/python3" -c "import importlib.metadata as m; print(', '.join(f'{n} {m.version(n)}' \
  for n in ['jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'torch', 'transformers']))")"
# gpu_check.sh installs .whl/*.whl into /tmp/site with the venv's pip, as the GPU machine does.
PATH="$VENV/bin:$PATH" bash benchmarks/gpu_check.sh --dry-run "$OUTDIR"
