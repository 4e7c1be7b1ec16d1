"""Times every attention backend at the sequence lengths the SD / XPSR UNet uses.

    python benchmarks/attention.py                 # CPU-sized defaults
    python benchmarks/attention.py --tokens 4096 --batch 2 --heads 8 --head-dim 40 --dtype bfloat16

Prints milliseconds per call (median of --repeats after one compile) for "xla", "chunked",
"cudnn" (GPU + half precision only) and PyTorch's scaled_dot_product_attention when torch is
installed, so the "auto" default can be checked on each platform.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from timing import median_ms, torch_median_ms
from xpsr_jax.models.attention import ATTENTION_BACKENDS, dot_product_attention, resolve_backend




def _torch_ms(q, k, v, repeats: int, device: str) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(q.dtype)]
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float32)).to(device, dtype).transpose(1, 2) for x in (q, k, v))

    return torch_median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}, "
          f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}")
    for tokens in args.tokens:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (args.batch, tokens, args.heads, args.head_dim), dtype) for key in keys)
        row = {}
        for backend in ATTENTION_BACKENDS:
            if backend == "auto":
                continue
            if backend == "cudnn" and not (on_gpu and dtype != jnp.float32):
                continue
            fn = jax.jit(lambda q, k, v, b=backend: dot_product_attention(q, k, v, backend=b))
            fn(q, k, v).block_until_ready()
            row[backend] = median_ms(lambda: fn(q, k, v).block_until_ready(), args.repeats)
        torch_ms = _torch_ms(q, k, v, args.repeats, "cuda" if on_gpu else "cpu")
        if torch_ms is not None:
            row["torch_sdpa"] = torch_ms
        auto = resolve_backend("auto", q, v)
        cells = ", ".join(f"{name} {ms:.2f} ms" for name, ms in row.items())
        print(f"tokens {tokens:5d}: {cells}  [auto -> {auto}]")


if __name__ == "__main__":
    main()
