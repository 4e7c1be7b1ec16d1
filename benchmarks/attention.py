"""Times every attention backend beside PyTorch's scaled_dot_product_attention, with ratios.

    python -m benchmarks.attention                          # CPU-sized defaults: self-attention
    python -m benchmarks.attention --tokens 1024 2304 --kv-tokens 77 --heads 4 --head-dim 8
    python -m benchmarks.attention --tokens 4096 --batch 2 --heads 8 --head-dim 40 --dtype bfloat16

For each query length (and key length: `--kv-tokens` for cross-attention, default = the query
length) it compiles every backend, then times them round-robin, one call each per round, so a
noisy shared machine slows all of them alike; each cell is the median over `--repeats` rounds
in ms, and in brackets its ratio to PyTorch SDPA (eager, no autograd) timed in the same rounds.
`auto` shows which backend it resolves to. The CPU crossover table of `auto`
(xpsr_jax.models.attention.CPU_AUTO_CROSSOVERS) comes from this script.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from xpsr_jax.models.attention import ATTENTION_BACKENDS, dot_product_attention, resolve_backend


def _torch_sdpa(q, k, v, device: str):
    try:
        import torch
    except ImportError:
        return None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(q.dtype)]
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float32)).to(device, dtype).transpose(1, 2).contiguous()
                  for x in (q, k, v))

    def call():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def round_robin_ms(calls: dict, repeats: int) -> dict[str, float]:
    """Median ms of each call, timed in `repeats` rounds of one call each (after one warm-up)."""
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(values)) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--kv-tokens", type=int, default=None, help="key/value length (default: --tokens)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backends", nargs="+", default=[b for b in ATTENTION_BACKENDS])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}, "
          f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}; ms, (ratio to torch SDPA)")
    for tokens in args.tokens:
        kv_tokens = args.kv_tokens or tokens
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (args.batch, tokens, args.heads, args.head_dim), dtype)
        k, v = (jax.random.normal(key, (args.batch, kv_tokens, args.heads, args.head_dim), dtype)
                for key in keys[1:])
        calls = {}
        for backend in args.backends:
            if backend == "cudnn" and not (on_gpu and dtype != jnp.float32):
                continue
            fn = jax.jit(lambda q, k, v, b=backend: dot_product_attention(q, k, v, backend=b))
            calls[backend] = lambda fn=fn: fn(q, k, v).block_until_ready()
        torch_call = _torch_sdpa(q, k, v, "cuda" if on_gpu else "cpu")
        if torch_call is not None:
            calls["torch_sdpa"] = torch_call
        ms = round_robin_ms(calls, args.repeats)
        torch_ms = ms.get("torch_sdpa")
        cells = ", ".join(
            f"{name} {value:.2f}" + (f" ({value / torch_ms:.2f})" if torch_ms and name != "torch_sdpa" else "")
            for name, value in ms.items())
        auto = resolve_backend("auto", q, v)
        print(f"q {tokens:5d} kv {kv_tokens:5d}: {cells}  [auto -> {auto}]", flush=True)


if __name__ == "__main__":
    main()
