"""Per-op summary of a `jax.profiler` trace: where a jitted step spends its device time.

    python -m benchmarks.profile_summary TRACE_DIR --hlo step.hlo.txt --steps 3 --name train \
        --step-ms 412.0 --md train_profile.md --json train_profile.json

TRACE_DIR is what `jax.profiler.trace(TRACE_DIR)` wrote (its newest *.xplane.pb is read with
`jax.profiler.ProfileData`, no TensorBoard needed). The op events are the device's kernels on a
GPU/TPU (the planes named /device:...), or the CPU runtime's per-op events (stat `hlo_op`) on a
CPU, so the dry run tests the same code. Each event names its HLO instruction (`hlo_op`); the
optimized HLO text of the traced program (`compiled.as_text()`, --hlo) says what that instruction
is, and the op's kind is decided from it in this order:

    collectives  all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute
    attention    cuDNN fused attention, or any op traced from an attention function (XLA attention's
                 dots, softmax and scans: the functions named in ATTENTION_FUNCTION)
    convolution  convolution (XLA or a cuDNN custom call)
    matmul       dot (XLA, cuBLAS or a Triton GEMM fusion)
    normalization  any op traced from a *Norm module / *norm function (GroupNorm, LayerNorm)
    copies/transposes  copy, transpose and pure data movement (slices, pads, concatenates, memcpy)
    elementwise  every other fusion or op (activations, residual adds, converts, optimizer updates)
    other        events with no HLO instruction (e.g. host-device memcpy)

A fusion takes the first kind any of its instructions has. The figures are per traced step (--steps)
and as % of the device's busy time; with --step-ms (the measured step) also as % of the step.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re

KINDS = ("collectives", "attention", "convolution", "matmul", "normalization", "copies/transposes",
         "elementwise", "other")
COLLECTIVE_OPS = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                  "all-reduce-start", "all-reduce-done", "all-gather-start", "all-gather-done",
                  "collective-permute-start", "collective-permute-done", "ragged-all-to-all"}
DATA_MOVEMENT_OPS = {"copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice", "dynamic-update-slice",
                     "concatenate", "pad", "broadcast", "parameter", "constant", "tuple", "get-tuple-element",
                     "copy-start", "copy-done", "iota", "gather", "reverse", "bitcast-convert"}
# Function names (the last part of a qualified name) whose ops count as attention: the kernels of
# xpsr_jax/models/attention.py (not the q/k/v projections, which are matmuls of Attention.__call__).
ATTENTION_FUNCTION = re.compile(r"(dot_product_attention|_attention|attend_query_block|key_step)$")
NORM_FUNCTION = re.compile(r"(Norm\.|norm$|_norm\b|group_norm|layer_norm)")
ATTENTION_TARGET = re.compile(r"fmha|flash|attention", re.IGNORECASE)
CONV_TARGET = re.compile(r"cudnn\$conv", re.IGNORECASE)
GEMM_TARGET = re.compile(r"cublas|gemm|matmul", re.IGNORECASE)

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w\-])([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"\b(?:calls|to_apply|called_computations)=\{?([^}\s,]+(?:,\s*%?[\w.\-]+)*)\}?")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->.*\{\s*$")


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    calls: list[str]
    target: str = ""
    frame: int | None = None
    op_name: str = ""


@dataclasses.dataclass
class HloModule:
    name: str
    instructions: dict[str, Instruction]
    computations: dict[str, list[str]]
    functions: dict[int, list[str]]  # stack frame id -> qualified function names, innermost first

    def kind(self, op: str) -> str:
        instruction = self.instructions.get(op)
        if instruction is None:
            return "other"
        seen = self._flatten(instruction)
        opcodes = {item.opcode for item in seen}
        targets = " ".join(item.target for item in seen)
        functions = [name for item in seen for name in self.functions.get(item.frame, [])]
        if opcodes & COLLECTIVE_OPS:
            return "collectives"
        if ATTENTION_TARGET.search(targets) or any(ATTENTION_FUNCTION.search(name.split(".")[-1])
                                                   for name in functions):
            return "attention"
        if "convolution" in opcodes or CONV_TARGET.search(targets):
            return "convolution"
        if "dot" in opcodes or GEMM_TARGET.search(targets):
            return "matmul"
        if any(NORM_FUNCTION.search(name) for name in functions):
            return "normalization"
        if opcodes <= DATA_MOVEMENT_OPS | {"fusion"}:
            return "copies/transposes"
        return "elementwise"

    def _flatten(self, instruction: Instruction) -> list[Instruction]:
        """The instruction and every instruction of the computations it calls (fusion bodies)."""
        out, stack, visited = [instruction], list(instruction.calls), set()
        while stack:
            computation = stack.pop()
            if computation in visited:
                continue
            visited.add(computation)
            for name in self.computations.get(computation, []):
                inner = self.instructions[name]
                out.append(inner)
                stack.extend(inner.calls)
        return out


def parse_hlo(text: str) -> HloModule:
    """The instructions, computations and stack frames of an HLO module's text (`as_text()`)."""
    header = re.search(r"^HloModule\s+([\w.\-]+)", text, re.MULTILINE)
    module = HloModule(header.group(1) if header else "", {}, {}, {})
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    section, computation = None, None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in tables:
            section = stripped
            continue
        if section and re.match(r"^\d+\s", stripped):
            number, rest = stripped.split(None, 1)
            tables[section][int(number)] = rest
            continue
        section = None if not stripped or _COMPUTATION.match(stripped) else section
        match = _COMPUTATION.match(stripped)
        if match:
            computation = match.group(1)
            module.computations[computation] = []
            continue
        if stripped == "}":
            computation = None
            continue
        match = _INSTRUCTION.match(line)
        if computation is None or not match:
            continue
        name, rest = match.groups()
        shape_end = _shape_end(rest)
        opcode = _OPCODE.search(rest, shape_end)
        calls = []
        for group in _CALLS.findall(rest):
            calls.extend(part.strip().lstrip("%") for part in group.split(","))
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        module.instructions[name] = Instruction(
            name, opcode.group(1) if opcode else "", calls, target.group(1) if target else "",
            int(frame.group(1)) if frame else None, op_name.group(1) if op_name else "")
        module.computations[computation].append(name)
    module.functions = _stack_functions(tables)
    return module


def _shape_end(rest: str) -> int:
    """Index just past the result shape at the start of an instruction's right-hand side (a tuple
    shape is parenthesised and may nest)."""
    if not rest.startswith("("):
        return rest.find(" ") + 1 if " " in rest else 0
    depth = 0
    for index, char in enumerate(rest):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return index + 1
    return 0


def _stack_functions(tables) -> dict[int, list[str]]:
    functions = {int(k): v.strip().strip('"') for k, v in tables["FunctionNames"].items()}
    locations = {}
    for key, value in tables["FileLocations"].items():
        match = re.search(r"function_name_id=(\d+)", value)
        locations[key] = functions.get(int(match.group(1)), "") if match else ""
    parents = {}
    frame_function = {}
    for key, value in tables["StackFrames"].items():
        location = re.search(r"file_location_id=(\d+)", value)
        parent = re.search(r"parent_frame_id=(\d+)", value)
        frame_function[key] = locations.get(int(location.group(1)), "") if location else ""
        parents[key] = int(parent.group(1)) if parent else None
    chains = {}
    for key in frame_function:
        chain, node, seen = [], key, set()
        while node is not None and node in frame_function and node not in seen:
            seen.add(node)
            chain.append(frame_function[node])
            node = parents[node] if parents[node] != node else None
        chains[key] = chain
    return chains


def _stat(event, name):
    for key, value in event.stats:
        if key == name:
            return value
    return None


def op_events(trace_dir: str):
    """(hlo_module, hlo_op or kernel name, duration ns) of every op event in the newest trace."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir} (was jax.profiler.trace given this folder?)")
    data = ProfileData.from_file(files[-1])
    # Accelerator planes only: libtpu adds an empty "/device:CUSTOM:Megascale Trace" plane to every
    # trace, TPU or not.
    device_planes = [plane for plane in data.planes
                     if plane.name.startswith("/device:") and not plane.name.startswith("/device:CUSTOM")]
    events = []
    for plane in device_planes:
        lines = list(plane.lines)
        ops_line = [line for line in lines if line.name == "XLA Ops"]  # TPU: one line of ops
        streams = ops_line or [line for line in lines if line.name.startswith("Stream")] or lines
        for line in streams:
            for event in line.events:
                module = str(_stat(event, "hlo_module") or "")
                op = _stat(event, "hlo_op")
                events.append((module, str(op) if op is not None else event.name, float(event.duration_ns),
                               op is not None))
    if not events:  # CPU: the runtime's per-op events on the host plane
        for plane in data.planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                for event in line.events:
                    op = _stat(event, "hlo_op")
                    if op is not None:
                        events.append((str(_stat(event, "hlo_module") or ""), str(op), float(event.duration_ns),
                                       True))
    return events, files[-1], bool(device_planes)


def summarize(trace_dir: str, hlo_texts: list[str], *, steps: int, step_ms: float | None = None,
              name: str = "", top: int = 15) -> dict:
    """The per-op and per-kind summary of a trace as a JSON-ready dict (see the module docstring)."""
    modules = [parse_hlo(text) for text in hlo_texts]
    events, path, on_device = op_events(trace_dir)
    by_module = collections.Counter()
    for module, _, duration, _ in events:
        by_module[module] += duration
    wanted = {m.name for m in modules if m.name}
    # Traced module names may carry a suffix ("jit_step(12)"): match on the HLO module name's prefix.
    def traced(module: str) -> bool:
        return not wanted or any(module == w or module.startswith(w + "(") or module.startswith(w + ".")
                                 for w in wanted)
    matched = any(traced(e[0]) for e in events)
    # Events with no HLO op (a device memcpy) are kept; when no module name matches, every event is.
    kept = [e for e in events if traced(e[0]) or not e[3]] if matched else events
    ops = collections.defaultdict(lambda: {"ns": 0.0, "count": 0, "kind": "other"})
    for module, op, duration, has_hlo in kept:
        kind = "other"
        if has_hlo:
            for hlo in modules:
                if op in hlo.instructions:
                    kind = hlo.kind(op)
                    break
            else:
                kind = _kind_from_kernel_name(op)
        else:
            kind = _kind_from_kernel_name(op)
        item = ops[op]
        item["ns"] += duration
        item["count"] += 1
        item["kind"] = kind
    total_ns = sum(item["ns"] for item in ops.values())
    per_step = lambda ns: ns / 1e6 / max(1, steps)  # noqa: E731
    kinds = {kind: 0.0 for kind in KINDS}
    for item in ops.values():
        kinds[item["kind"]] += item["ns"]
    ranked = sorted(ops.items(), key=lambda kv: -kv[1]["ns"])
    busy_ms = per_step(total_ns)

    def share(ns):
        entry = {"ms_per_step": round(per_step(ns), 4), "percent_of_device_time": round(100 * ns / total_ns, 2)
                 if total_ns else 0.0}
        if step_ms:
            entry["percent_of_step"] = round(100 * per_step(ns) / step_ms, 2)
        return entry

    return {
        "name": name, "trace": path, "source": "device kernels" if on_device else "CPU runtime op events",
        "steps": steps, "step_ms": step_ms, "device_busy_ms_per_step": round(busy_ms, 4),
        "ops_traced": len(ops), "modules": sorted(wanted) or sorted(by_module),
        "module_match": "matched" if matched or not wanted else "no match: every module counted",
        "kinds": {kind: share(ns) for kind, ns in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops": [dict(op=op, kind=item["kind"], calls_per_step=round(item["count"] / max(1, steps), 2),
                         **share(item["ns"])) for op, item in ranked[:top]],
    }


def _kind_from_kernel_name(name: str) -> str:
    """Best guess for an event without a known HLO instruction: a kernel or memcpy name."""
    lowered = name.lower()
    if "memcpy" in lowered or "memset" in lowered or "copy" in lowered or "transpose" in lowered:
        return "copies/transposes"
    if "nccl" in lowered:
        return "collectives"
    if "fmha" in lowered or "flash" in lowered:
        return "attention"
    if "conv" in lowered:
        return "convolution"
    if "gemm" in lowered or "xmma" in lowered or "cutlass" in lowered or "matmul" in lowered:
        return "matmul"
    return "other"


def markdown(summary: dict) -> str:
    """The summary as Markdown: time per kind, then the top ops."""
    step = f", measured step {summary['step_ms']:.2f} ms" if summary.get("step_ms") else ""
    lines = [f"### Profile: {summary['name']}", "",
             f"{summary['source']}, {summary['steps']} traced step(s), device busy "
             f"{summary['device_busy_ms_per_step']:.3f} ms per step{step}; {summary['ops_traced']} distinct ops; "
             f"modules {', '.join(summary['modules'])} ({summary['module_match']})", "",
             "| kind | ms / step | % of device time |" + (" % of step |" if step else ""),
             "|---|---:|---:|" + ("---:|" if step else "")]
    for kind, entry in summary["kinds"].items():
        lines.append(f"| {kind} | {entry['ms_per_step']:.3f} | {entry['percent_of_device_time']:.1f} |"
                     + (f" {entry['percent_of_step']:.1f} |" if step else ""))
    lines += ["", "| top op | kind | calls / step | ms / step | % of device time |", "|---|---|---:|---:|---:|"]
    for item in summary["top_ops"]:
        lines.append(f"| `{item['op']}` | {item['kind']} | {item['calls_per_step']:g} | {item['ms_per_step']:.3f} "
                     f"| {item['percent_of_device_time']:.1f} |")
    return "\n".join(lines) + "\n"


def write(summary: dict, md_path: str | None, json_path: str | None) -> None:
    if md_path:
        with open(md_path, "w", encoding="utf-8") as handle:
            handle.write(markdown(summary))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=1)


def profile_compiled(run, compiled, out_dir: str, name: str, *, steps: int, step_ms: float | None = None) -> dict:
    """Trace `steps` calls of `run()` (a warm compiled program: no compile inside the trace), save the
    optimized HLO beside the trace, and write OUT_DIR/NAME_profile.{md,json}. Returns the summary."""
    import jax

    trace_dir = os.path.join(out_dir, f"{name}_trace")
    os.makedirs(trace_dir, exist_ok=True)
    hlo_text = compiled.as_text()
    with open(os.path.join(out_dir, f"{name}.hlo.txt"), "w", encoding="utf-8") as handle:
        handle.write(hlo_text)
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            run()
    summary = summarize(trace_dir, [hlo_text], steps=steps, step_ms=step_ms, name=name)
    write(summary, os.path.join(out_dir, f"{name}_profile.md"), os.path.join(out_dir, f"{name}_profile.json"))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", help="the folder given to jax.profiler.trace")
    parser.add_argument("--hlo", nargs="*", default=[], help="optimized HLO text file(s) of the traced program(s)")
    parser.add_argument("--steps", type=int, default=1, help="how many steps the trace holds")
    parser.add_argument("--step-ms", type=float, default=None, help="the measured step time, for %% of the step")
    parser.add_argument("--name", default="", help="a title for the summary")
    parser.add_argument("--top", type=int, default=15, help="how many ops to list")
    parser.add_argument("--md", default=None, help="write the Markdown here (default: print it)")
    parser.add_argument("--json", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    texts = []
    for path in args.hlo:
        with open(path, encoding="utf-8") as handle:
            texts.append(handle.read())
    summary = summarize(args.trace_dir, texts, steps=args.steps, step_ms=args.step_ms, name=args.name, top=args.top)
    write(summary, args.md, args.json)
    if not args.md:
        print(markdown(summary))


if __name__ == "__main__":
    main()
