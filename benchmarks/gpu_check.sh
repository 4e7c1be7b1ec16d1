#!/usr/bin/env bash
# The project's GPU check: ONE call on one CUDA GPU (H100/H200) with JAX + PyTorch preinstalled and
# no network, from anywhere; it finishes within 10 minutes (every row has a timeout inside one
# 570 s budget). SD 1.5 size XPSR with constant / random weights, 512 px, bf16, xpsr-jax vs the
# PyTorch reference (tests/torch_reference: diffusers layers, SDPA; eager, and torch.compile if it
# compiles in the time left):
#   - the training step at per-device batch 1, 2, 4, with and without remat: images/s, peak memory, MFU
#   - the 20-step sampling loop at batch 1 and 8: seconds per image
#   - XPSR parity with the PyTorch reference on this GPU (fp32, highest matmul precision)
#   - a profile of the train step (largest batch, remat none) and of the sampling loop (batch 8):
#     the top ops and the device time per kind of op (benchmarks/profile_summary.py)
# A preflight first (versions, the GPU seen by JAX and PyTorch, one small compile) stops the run
# within seconds when the environment is broken.
# Writes OUTDIR/gpu_check.md (the table), OUTDIR/results.jsonl (its records), OUTDIR/gpu_check.log,
# OUTDIR/parity.log, OUTDIR/profile.md + profile.json (the profile summaries) and
# OUTDIR/profile_raw.tar.gz (the traces and optimized HLO, when under 16 MiB), and prints the table.
# OUTDIR: the argument, else $OUT, else /tmp/gpu_check. GPU_CHECK_BUDGET=SECONDS sets the overall
# budget (default 570 on a GPU).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run [OUTDIR]    # every row on CPU at micro size (minutes: see below)
#   bash benchmarks/gpu_check.sh --rows large [OUTDIR] # a second call: large outputs instead of the rows above
#
# --rows large: SD 1.5 size, bf16, 20 DDPM steps, 2048 and 4096 px outputs with the default tiles
# and the streaming tiled VAE (benchmarks/large_image.py, each size in a fresh process): compile s,
# sampling s and device peak memory, in OUTDIR/large_image.md and under the table. Its dry run
# uses the micro model at 1024 px, 1 step, CPU tiles (about 6 minutes on 2 cores).
#
# The dry run (JAX_PLATFORMS=cpu, no nvidia-smi) passes the same scripts CPU flags and the "micro"
# size (the tiny widths with two UNet levels: half the compile), so every code path of the GPU run
# executes; torch.compile uses its "eager" backend there (the compile path, not
# inductor's codegen). Its cost is 2 train-step compiles in parallel + the sampling loop + 7 process
# start-ups; tests/test_gpu_check.py runs it (row timeouts x4 inside a 1500 s budget).
# Wheels the machine lacks (diffusers and ml-collections) travel in .whl/ and are installed into
# /tmp/site without network or dependencies; the preflight line lists any module still missing.
set -u
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
DRY=0
OUTDIR=""
ROWS=main
EXPECT_ROWS=0
for arg in "$@"; do
  if [ "$EXPECT_ROWS" = 1 ]; then
    case "$arg" in
      main|large) ROWS=$arg; EXPECT_ROWS=0; continue ;;
      *) echo "gpu_check.sh: --rows $arg (valid: main, large)" >&2; exit 2 ;;
    esac
  fi
  case "$arg" in
    --dry-run) DRY=1 ;;
    --rows) EXPECT_ROWS=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (valid: --dry-run, --rows main|large, -h)" >&2; exit 2 ;;
    *) [ -z "$OUTDIR" ] || { echo "gpu_check.sh: one OUTDIR only (got $OUTDIR and $arg)" >&2; exit 2; }
       OUTDIR=$arg ;;
  esac
done
[ "$EXPECT_ROWS" = 0 ] || { echo "gpu_check.sh: --rows needs a value (main, large)" >&2; exit 2; }
OUTDIR=${OUTDIR:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
RESULTS=$OUTDIR/results.jsonl
TABLE=$OUTDIR/gpu_check.md
LOG=$OUTDIR/gpu_check.log
: > "$RESULTS"
: > "$LOG"
START=$(date +%s)
BUDGET=570   # seconds for everything; the 10-minute limit minus a margin for the start-up
SCALE=1      # row timeouts x SCALE (the dry run: CPU compiles on a possibly shared machine)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    || { echo "gpu_check.sh: installing .whl/*.whl failed (see $LOG)" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

if [ "$DRY" = 1 ]; then
  # The same scripts and code paths at micro size on the CPU; compile with few optimizations.
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES="" JAX_DISABLE_MOST_OPTIMIZATIONS=true
  # One batch size each (the matrix still has two remat entries): every compile costs ~1 CPU minute.
  SIZE=(--size micro); TRAIN_PX=64; SAMPLE_PX=64; STEPS=2; TRAIN_BATCHES=(1); SAMPLE_BATCHES=(1)
  TIMING=(--steps 2 --warmup 1); REPEATS=1; THREADS=2; COMPILE_BACKEND=eager; DTYPE=bfloat16
  DEVICE="CPU (dry run: micro model, $(nproc) cores)"; PARITY_K="sfa_everywhere and not non"
  LARGE=(--model micro --sizes 1024 --steps 1 --tiles cpu)
  BUDGET=${GPU_CHECK_BUDGET:-1500}; SCALE=4
  export OMP_NUM_THREADS=1  # PyTorch's CPU threads collapse on a loaded machine; speed is not the point here
else
  SIZE=(--size sd15); TRAIN_PX=512; SAMPLE_PX=512; STEPS=20; TRAIN_BATCHES=(1 2 4); SAMPLE_BATCHES=(1 8)
  TIMING=(--steps 5 --warmup 2); REPEATS=2; THREADS=6; COMPILE_BACKEND=inductor; DTYPE=bfloat16
  DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)
  PARITY_K="sfa_everywhere"
  LARGE=(--model sd15 --sizes 2048 4096 --steps 20)
  BUDGET=${GPU_CHECK_BUDGET:-$BUDGET}
fi
TORCH_ONLY=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)  # PyTorch rows: JAX must not reserve the GPU

left() { echo $((BUDGET - ($(date +%s) - START))); }

# row NAME CAP CMD...: runs CMD under `timeout min(CAP, time left)`, output to the log; a crash or
# timeout adds an error record naming the row (the table shows it as `error: ...`).
row() {
  local name=$1 cap=$(($2 * SCALE)) limit rc began
  shift 2
  limit=$(left); [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 5 ]; then
    printf '{"row": "%s", "error": "not run: the %s s budget is spent"}\n' "$name" "$BUDGET" >>"$RESULTS"
    return
  fi
  began=$(date +%s)
  echo "== $name (timeout ${limit} s)" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "   rc $rc after $(($(date +%s) - began)) s" | tee -a "$LOG"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    printf '{"row": "%s", "error": "timed out after %s s"}\n' "$name" "$limit" >>"$RESULTS"
  elif [ "$rc" != 0 ]; then
    printf '{"row": "%s", "error": "exit status %s (see gpu_check.log)"}\n' "$name" "$rc" >>"$RESULTS"
  fi
}

VERSIONS=$(python3 -c "
import importlib.metadata as m, sys
names = ['jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'torch', 'transformers', 'diffusers']
def version(name):
    try:
        return m.version(name)
    except Exception:
        return 'absent'
print('python', sys.version.split()[0], ', '.join(f'{n} {version(n)}' for n in names))" 2>&1 | tail -1)
MISSING=$(python3 - <<'EOF' 2>&1
import importlib
# What the rows import at module level (the benchmark scripts, xpsr_jax.{models,training,inference},
# tests/torch_reference): report what is absent before anything runs.
names = ["jax", "flax", "optax", "orbax.checkpoint", "numpy", "scipy", "safetensors", "torch", "transformers",
         "diffusers", "ml_collections", "PIL", "pytest"]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__})")
print("missing: " + (", ".join(missing) if missing else "none"))
EOF
)
echo "device: $DEVICE; $VERSIONS; $MISSING" | tee -a "$LOG"
# Preflight: the accelerator must be what JAX and PyTorch see, and a jit must compile and run;
# otherwise stop now rather than spend the budget compiling SD 1.5 on the host CPU.
if [ "$DRY" = 0 ]; then
  timeout 120 python3 - >>"$LOG" 2>&1 <<'EOF'
import time, jax, jax.numpy as jnp
start = time.perf_counter()
devices = jax.devices()
assert devices[0].platform == "gpu", f"JAX sees {devices} (no GPU backend: is the CUDA plugin installed?)"
x = jnp.ones((1024, 1024), jnp.bfloat16)
value = float(jax.jit(lambda a: (a @ a).astype(jnp.float32).mean())(x))
assert value == 1024.0, value
print(f"preflight: {devices[0].device_kind}, jit ok in {time.perf_counter() - start:.1f} s")
EOF
  [ $? = 0 ] || { tail -20 "$LOG"; echo "gpu_check.sh: preflight failed (JAX on the GPU; see above)" >&2; exit 3; }
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 60 python3 -c "import torch; assert torch.cuda.is_available(), \
    'PyTorch sees no CUDA device'; print('preflight: torch', torch.cuda.get_device_name(0))" >>"$LOG" 2>&1 \
    || { tail -20 "$LOG"; echo "gpu_check.sh: preflight failed (PyTorch on the GPU; see above)" >&2; exit 3; }
  grep '^preflight' "$LOG"
fi
if [ "$ROWS" = large ]; then
  row "large outputs, xpsr-jax, ${LARGE[*]}" 540 python3 -m benchmarks.large_image "${LARGE[@]}" --dtype "$DTYPE" \
    --timeout $(( $(left) / 2 - 5 )) --json "$RESULTS.large"
  # large_image.py prints its own table (a size that fails or times out is a row saying so).
  grep -h '^|' "$LOG" | grep -v '^| row ' > "$OUTDIR/large_image.md"
  {
    echo "# gpu_check.sh --rows large$( [ "$DRY" = 1 ] && echo ' --dry-run')"
    echo
    echo "device: $DEVICE; $VERSIONS; $MISSING; total $(($(date +%s) - START)) s"
    echo
    cat "$OUTDIR/large_image.md"
    python3 -m benchmarks.common table "$RESULTS" 2>&1 | grep '| error: '
  } > "$TABLE"
  cat "$TABLE"
  grep -q '| error: ' "$TABLE" && exit 1
  exit 0
fi
PROFILE_DIR=$(mktemp -d)

PARITY="parity with the PyTorch reference (fp32, XPSR SFA ControlNet + UNet)"
row "$PARITY" 60 bash -c "set -o pipefail; python3 -m pytest -q -p no:cacheprovider -s tests/test_xpsr_models.py \
  -k '$PARITY_K' > '$OUTDIR/parity.log' 2>&1; status=\$?; cat '$OUTDIR/parity.log'; [ \$status = 0 ] && \
  python3 -m benchmarks.common parity '$OUTDIR/parity.log' '$RESULTS' '$PARITY'"
row "train, xpsr-jax, batch ${TRAIN_BATCHES[*]} x remat none / attention" 300 \
  python3 -m benchmarks.train_speed "${SIZE[@]}" --resolution "$TRAIN_PX" --dtype "$DTYPE" \
  --batch "${TRAIN_BATCHES[@]}" --remat none attention "${TIMING[@]}" --compile-threads "$THREADS" \
  --skip-torch --json "$RESULTS" --profile "$PROFILE_DIR" --profile-steps 3
row "train, PyTorch eager, batch ${TRAIN_BATCHES[*]}" 75 "${TORCH_ONLY[@]}" \
  python3 -m benchmarks.train_speed "${SIZE[@]}" --resolution "$TRAIN_PX" --dtype "$DTYPE" \
  --batch "${TRAIN_BATCHES[@]}" "${TIMING[@]}" --skip-jax --json "$RESULTS"
row "sampling, xpsr-jax, batch ${SAMPLE_BATCHES[*]}" 150 \
  python3 -m benchmarks.sampling_speed "${SIZE[@]}" --pixels "$SAMPLE_PX" --steps "$STEPS" --dtype "$DTYPE" \
  --batch "${SAMPLE_BATCHES[@]}" --repeats "$REPEATS" --compile-threads 2 --skip-torch --json "$RESULTS" \
  --profile "$PROFILE_DIR"
row "sampling, PyTorch eager, batch ${SAMPLE_BATCHES[*]}" 90 "${TORCH_ONLY[@]}" \
  python3 -m benchmarks.sampling_speed "${SIZE[@]}" --pixels "$SAMPLE_PX" --steps "$STEPS" --dtype "$DTYPE" \
  --batch "${SAMPLE_BATCHES[@]}" --repeats "$REPEATS" --skip-jax --json "$RESULTS"
row "one-step sampling, xpsr-jax and PyTorch eager, batch 1" 90 "${TORCH_ONLY[@]}" \
  python3 -m benchmarks.sampling_speed "${SIZE[@]}" --pixels "$SAMPLE_PX" --dtype "$DTYPE" --one-step \
  --batch 1 --repeats "$REPEATS" --json "$RESULTS"
# torch.compile last, in what is left: a compile that does not finish is reported in its cell.
half=$(( ($(left) - 10) / 2 )); [ "$half" -gt $((150 * SCALE)) ] && half=$((150 * SCALE))
row "train, PyTorch torch.compile, batch 1" $(((half + 5) / SCALE + 1)) "${TORCH_ONLY[@]}" \
  python3 -m benchmarks.train_speed "${SIZE[@]}" --resolution "$TRAIN_PX" --dtype "$DTYPE" --batch 1 \
  "${TIMING[@]}" --skip-jax --skip-torch --torch-compile "$COMPILE_BACKEND" --compile-timeout "$half" \
  --json "$RESULTS"
half=$(( $(left) - 10 )); [ "$half" -gt $((150 * SCALE)) ] && half=$((150 * SCALE))
row "sampling, PyTorch torch.compile, batch 1" $(((half + 5) / SCALE + 1)) "${TORCH_ONLY[@]}" \
  python3 -m benchmarks.sampling_speed "${SIZE[@]}" --pixels "$SAMPLE_PX" --steps "$STEPS" --dtype "$DTYPE" \
  --batch 1 --repeats "$REPEATS" --skip-jax --skip-torch --torch-compile "$COMPILE_BACKEND" \
  --compile-timeout "$half" --json "$RESULTS"

# The profiles: summaries side by side, raw traces + optimized HLO in one archive if it fits what
# the device tool brings back (16 MiB a file).
cat "$PROFILE_DIR"/*_profile.md > "$OUTDIR/profile.md" 2>/dev/null
python3 -c "import glob, json, sys; json.dump({p.split('/')[-1][:-len('_profile.json')]: json.load(open(p)) \
  for p in sorted(glob.glob(sys.argv[1] + '/*_profile.json'))}, open(sys.argv[2], 'w'), indent=1)" \
  "$PROFILE_DIR" "$OUTDIR/profile.json" >>"$LOG" 2>&1
tar -C "$PROFILE_DIR" -czf "$OUTDIR/profile_raw.tar.gz" . >>"$LOG" 2>&1
if [ "$(stat -c %s "$OUTDIR/profile_raw.tar.gz" 2>/dev/null || echo 0)" -gt $((16 * 1024 * 1024)) ]; then
  tar -C "$PROFILE_DIR" -czf "$OUTDIR/profile_raw.tar.gz" --exclude='*_trace' . >>"$LOG" 2>&1
  echo "profile_raw.tar.gz: traces left out (over 16 MiB), HLO kept" | tee -a "$LOG"
fi
rm -rf "$PROFILE_DIR"

{
  echo "# gpu_check.sh$( [ "$DRY" = 1 ] && echo ' --dry-run')"
  echo
  echo "device: $DEVICE; $VERSIONS; $MISSING; total $(($(date +%s) - START)) s"
  echo
  python3 -m benchmarks.common table "$RESULTS" 2>&1
  echo
  grep -h -B 4 -A 10 '^| kind ' "$OUTDIR/profile.md" 2>/dev/null | grep -v -e '^$' -e '^--$'
  echo
  echo "ratios: our time / PyTorch time per image (< 1: xpsr-jax is faster); the PyTorch training"
  echo "step runs without gradient checkpointing, so remat rows compare against the same PyTorch step."
} > "$TABLE"
cat "$TABLE"
grep -q '| error: ' "$TABLE" && exit 1
exit 0
