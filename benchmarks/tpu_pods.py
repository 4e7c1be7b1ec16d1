"""Pod-scale figures of SD 1.5-size XPSR, from XLA:TPU compiles on this machine
(`python -m xpsr_jax.tpu_plan`; needs `pip install -e ".[tpu]"`, no TPU).

    python -m benchmarks.tpu_pods --rows search --out tpu_pods.jsonl   # largest per-chip batch per remat
    python -m benchmarks.tpu_pods --rows pods --out tpu_pods.jsonl     # whole pods at those batches
    python -m benchmarks.tpu_pods --rows sample --out tpu_pods.jsonl   # the sampler, batch 1-8, and 2048 px
    python -m benchmarks.tpu_pods --table tpu_pods.jsonl               # the Markdown tables
    python -m benchmarks.tpu_pods --rows attention                     # xla vs splash memory, seconds

Each row is one `tpu_plan` command in its own process (its own peak memory, nothing shared), its
JSON appended to `--out` as it finishes; a rerun skips rows already there. Per-chip memory does not
depend on how many chips share the data axis, nor fsdp's on anything but the fsdp size, so the
batch search runs on the smallest slice of each generation (v5e:2x2, v5p:2x2x1, v6e:2x2, fsdp 4)
and the whole-pod rows compile once at the batch found. SD 1.5-size compiles take minutes each and
up to the host's memory: run one row at a time, nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--program", "train", "--config", "configs/train.py", "--config.attention_backend=auto"]
SAMPLE = ["--program", "sample", "--config", "configs/infer.py", "--config.dtype=bfloat16",
          "--config.param_dtype=bfloat16", "--config.attention_backend=auto"]
SHARDINGS = {"dp": [], "fsdp4": ["--config.mesh.fsdp=4", "--config.mesh.shard_trainable=True",
                                 "--config.mesh.shard_frozen=True"]}
SMALL = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
PODS = [("v5e:16x16", 1), ("v5p:4x4x4", 1), ("v6e:16x16", 1), ("v5p:4x4x4", 2)]
REMAT = ("none", "attention", "full")


def search_rows() -> list[dict]:
    """Every generation x sharding x remat with "auto" attention (splash for SD's 4096-token
    self-attention on TPU), and v5e data-parallel with XLA's attention beside it."""
    rows = [{"kind": "search", "generation": generation, "sharding": sharding, "remat": remat, "attention": "auto",
             "argv": ["--topology", topology, *TRAIN, *SHARDINGS[sharding], "--search-batch", "--remat", remat,
                      "--max-batch", "64"]}
            for generation, topology in SMALL.items() for sharding in SHARDINGS for remat in REMAT]
    rows += [{"kind": "search", "generation": "v5e", "sharding": "dp", "remat": remat, "attention": "xla",
              "argv": ["--topology", SMALL["v5e"], *TRAIN, "--config.attention_backend=xla", "--search-batch",
                       "--remat", remat, "--max-batch", "64"]} for remat in REMAT]
    return rows


def pod_rows(found: dict) -> list[dict]:
    rows = []
    for topology, slices in PODS:
        generation = topology.split(":")[0]
        for sharding in SHARDINGS:
            best = max(((row["remat"], row["largest"]) for row in found.values()
                        if row["generation"] == generation and row["sharding"] == sharding),
                       key=lambda item: item[1], default=None)
            if not best or not best[1]:
                continue
            remat, batch = best
            rows.append({"kind": "pod", "topology": topology, "slices": slices, "sharding": sharding, "remat": remat,
                         "argv": ["--topology", topology, "--num-slices", str(slices), *TRAIN, *SHARDINGS[sharding],
                                  f"--config.remat.unet={remat}", f"--config.remat.controlnet={remat}",
                                  "--batch-per-chip", str(batch)]})
    return rows


def sample_rows() -> list[dict]:
    rows = [{"kind": "sample", "topology": topology, "batch": batch, "size": 512,
             "argv": ["--topology", topology, *SAMPLE, "--batch-per-chip", str(batch), "--size", "512"]}
            for topology in ("v5e:2x2", "v6e:2x2") for batch in (1, 2, 4, 8)]
    rows += [{"kind": "sample", "topology": topology, "batch": 1, "size": 2048,
              "argv": ["--topology", topology, *SAMPLE, "--batch-per-chip", "1", "--size", "2048"]}
             for topology in ("v5e:2x2", "v6e:2x2")]
    return rows


def attention_table(topology_name: str = "v5e:2x2") -> str:
    """Per-chip memory of one attention's forward and backward (bf16, 2 images per chip, 8 heads)
    with XLA's attention and the splash kernel, at SD's self-attention lengths: where XLA starts
    to hold the logits is where "auto" switches to splash (`TPU_SPLASH_MIN_TOKENS`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from xpsr_jax.models.attention import dot_product_attention
    from xpsr_jax.tpu_plan.analysis import Memory, custom_calls
    from xpsr_jax.tpu_plan.topology import load_topology

    topology = load_topology(topology_name)
    mesh = Mesh(np.asarray(topology.devices), ("data",))
    lines = [f"| tokens x heads x dims | xla temp MiB | splash temp MiB | splash kernels | ({topology_name}, "
             "bf16, fwd + bwd, 2 images per chip) |", "|---|---:|---:|---:|---|"]
    for tokens, dim in ((256, 160), (1024, 80), (2304, 40), (3136, 40), (4096, 40)):
        shape = jax.ShapeDtypeStruct((2 * len(topology.devices), tokens, 8, dim), jnp.bfloat16)
        temps, kernels = {}, 0
        for backend in ("xla", "splash"):
            def loss(q, k, v, backend=backend):
                return jnp.sum(dot_product_attention(q, k, v, backend=backend).astype(jnp.float32))

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=NamedSharding(mesh, P("data")))
            with jax.set_mesh(mesh):
                compiled = grad.lower(shape, shape, shape).compile()
            temps[backend] = Memory.of(compiled).temp / 2**20
            kernels = custom_calls(compiled.as_text()).get("tpu_custom_call", kernels)
        lines.append(f"| {tokens} x 8 x {dim} | {temps['xla']:.1f} | {temps['splash']:.1f} | {kernels} | |")
    return "\n".join(lines)


def key(row: dict) -> str:
    return " ".join(row["argv"])


def run_row(row: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "plan.json"
        command = [sys.executable, "-m", "xpsr_jax.tpu_plan", *row["argv"], "--json", str(out)]
        print("$", shlex.join(command[1:]), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(done.stdout[-3000:], done.stderr[-1500:], sep="\n", flush=True)
        result = json.loads(out.read_text()) if out.is_file() else None
    return {**row, "command": "python -m xpsr_jax.tpu_plan " + shlex.join(row["argv"]), "exit": done.returncode,
            "wall_seconds": seconds, "result": result, "error": None if result else done.stderr[-2000:]}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def found_batches(records: list[dict]) -> dict:
    found = {}
    for record in records:
        if record["kind"] == "search" and record["result"]:
            search = record["result"]["search"][0]
            if record.get("attention", "auto") == "auto":
                found[key(record)] = {"generation": record["generation"], "sharding": record["sharding"],
                                      "remat": record["remat"], "largest": search["largest_batch_per_chip"]}
    return found


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def table(records: list[dict]) -> str:
    lines = ["Largest per-chip batch (512 px, bf16 compute, the default config otherwise):", "",
             "| generation (slice) | sharding | attention | remat | largest batch per chip | GiB at it | temp GiB | "
             "img/s/chip bound | compile s (all tries) | command |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for record in records:
        if record["kind"] != "search" or not record["result"]:
            continue
        search = record["result"]["search"][0]
        at = search["at_largest"] or {}
        figures = at.get("figures") or {}
        bound = (figures.get("roofline") or {}).get("images_per_second_per_chip")
        memory = figures.get("memory") or {}
        lines.append(f"| {record['generation']} ({SMALL[record['generation']]}) | {record['sharding']} | "
                     f"{record.get('attention', 'auto')} | {record['remat']} | {search['largest_batch_per_chip']} | "
                     f"{gib(memory.get('total'))} | {gib(memory.get('temp'))} | {'-' if bound is None else f'{bound:.1f}'} | "
                     f"{record['wall_seconds']:.0f} | `{record['command']}` |")
    lines += ["", "Whole pods at that batch:", "",
              "| topology | chips / hosts | sharding | remat | batch/chip | GiB/chip | fits | TFLOP/chip/step | "
              "collective MiB/chip/step | bound ms/step | img/s/chip bound | compile s | host GiB | command |",
              "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for record in records:
        result = record["result"]
        if record["kind"] != "pod" or not result:
            continue
        figures = result.get("figures") or {}
        roofline = figures.get("roofline") or {}
        moved = sum(c["bytes"] for c in (figures.get("collectives") or {}).values())
        topology = result["topology"]
        lines.append(
            f"| {record['topology']} x{record['slices']} | {topology['chips']} / {topology['hosts']} | "
            f"{record['sharding']} | {record['remat']} | {result['batch_per_chip']} | "
            f"{gib((figures.get('memory') or {}).get('total'))} | {'yes' if result['fits'] else 'no'} | "
            f"{(figures.get('flops') or 0) / 1e12:.2f} | {moved / 2**20:.0f} | "
            f"{(roofline.get('step_seconds') or 0) * 1e3:.1f} | {roofline.get('images_per_second_per_chip') or 0:.1f} | "
            f"{result['compile']['compile_seconds']:.0f} | {gib(result['compile']['host_peak_rss_bytes'])} | "
            f"`{record['command']}` |")
    lines += ["", "The sampler (20 DDPM steps with CFG, bf16, one host's chips):", "",
              "| topology | size px | batch/chip | GiB/chip | fits | TFLOP/chip | bound s/call | img/s/chip bound | "
              "compile s | command |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for record in records:
        result = record["result"]
        if record["kind"] != "sample" or not result:
            continue
        figures = result.get("figures") or {}
        roofline = figures.get("roofline") or {}
        lines.append(f"| {record['topology']} | {record['size']} | {record['batch']} | "
                     f"{gib((figures.get('memory') or {}).get('total'))} | {'yes' if result['fits'] else 'no'} | "
                     f"{(figures.get('flops') or 0) / 1e12:.1f} | {roofline.get('step_seconds') or 0:.3f} | "
                     f"{roofline.get('images_per_second_per_chip') or 0:.1f} | "
                     f"{result['compile']['compile_seconds']:.0f} | `{record['command']}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tpu_pods", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", choices=("search", "pods", "sample", "attention"), help="which rows to compile")
    parser.add_argument("--out", default="tpu_pods.jsonl", help="JSON lines, appended row by row")
    parser.add_argument("--only", default="", help="run only rows whose command contains this text")
    parser.add_argument("--table", metavar="FILE", help="print the Markdown tables of FILE and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(table(load(Path(args.table))))
        return 0
    if args.rows == "attention":
        print(attention_table())
        return 0
    out = Path(args.out)
    records = load(out)
    done = {key(record) for record in records}
    rows = {"search": search_rows, "sample": sample_rows,
            "pods": lambda: pod_rows(found_batches(records))}[args.rows or "search"]()
    for row in rows:
        if key(row) in done or args.only not in key(row):
            continue
        record = run_row(row)
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    print(table(load(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
