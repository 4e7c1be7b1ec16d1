#!/usr/bin/env bash
# The project's GPU check, one call on a CUDA machine with JAX + PyTorch preinstalled, from the repo root.
# Wheels the machine lacks (diffusers for the PyTorch reference) travel in .whl/ (see README, "GPU check").
# Prints: devices, XPSR step speed and the 20-step sampling loop vs the PyTorch reference, attention
# backends, XPSR parity on GPU.
set -u
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
log=${OUT:-/tmp}/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
  echo "== XPSR denoising step (ControlNet + UNet), SD 1.5 size, 512 px, CFG batch 2, bf16"
  timeout 170 python3 benchmarks/xpsr_step_speed.py --dtype bfloat16 --repeats 10
  echo "== 20-step XPSR sampling loop (DDPM, CFG, VAE + colour fix), SD 1.5 size, 512 px, bf16, batch 1 and 8"
  timeout 240 python3 benchmarks/sampling_speed.py --size sd15 --batch 1 8 --dtype bfloat16 --repeats 3
  echo "== attention backends, 4096 tokens (top-level pixel attention at 512 px), bf16"
  timeout 40 python3 benchmarks/attention.py --tokens 4096 --heads 8 --head-dim 40 --dtype bfloat16 --repeats 10
  echo "== XPSR parity with the PyTorch reference on this GPU (fp32, highest matmul precision)"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -s tests/test_xpsr_models.py -k "sfa_everywhere" 2>&1 \
    | grep -E "UNet with residuals|mid residual|passed|failed|Error"
} 2>&1 | tee "$log"
