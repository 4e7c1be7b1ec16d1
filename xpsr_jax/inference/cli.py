"""`python infer.py` / `python -m xpsr_jax.infer`: super-resolve a file or a folder.

    python infer.py --weights xpsr --sd15 sd15 --input LR_DIR --output OUT [--captions captions.jsonl]
    python infer.py ... --config configs/infer.py:validation --config.num_inference_steps=25
    python -m xpsr_jax.models.tiny --out /tmp/tiny && python infer.py --weights /tmp/tiny/xpsr \
        --sd15 /tmp/tiny/sd15 --input examples/lr --output /tmp/sr --config configs/infer.py:tiny \
        --highlevel-prompt "a photo" --lowlevel-prompt "blurry"

Every bad input (unreadable or non-image file, image under 8 px, missing prompt) gets one line
naming the file and the reason; the rest still run; a summary lists the failures and the exit
status is 1 if any failed. Outputs are written under a temporary name and renamed, and existing
outputs are skipped unless --overwrite. With --num-processes > 1 (one process per host, or
several on one machine) each process takes its share of the files.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from xpsr_jax.cli_config import ConfigFlagError, parse_config_flags
from xpsr_jax.data.images import IMAGE_SUFFIXES, ImageReadError, read_rgb, write_png_atomic
from xpsr_jax.inference.config import validate_infer_config
from xpsr_jax.inference.pipeline import WeightsFolderError, XPSRPipeline
from xpsr_jax.inference.preprocess import MIN_SIDE, InputImageError, preprocess_lr
from xpsr_jax.inference.prompts import OFFICIAL_LR_FOLDER, MissingPromptError, PromptSource, is_official_layout

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "infer.py")


class Job(NamedTuple):
    path: Path
    target: Path
    image: np.ndarray
    highlevel: str
    lowlevel: str
    processed_shape: tuple


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python infer.py", description="XPSR super-resolution of an image or a folder.",
        epilog="Config: --config configs/infer.py[:validation|tiny] and --config.KEY=VALUE overrides "
               "(see configs/infer.py).", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an image, a folder of images, or an official "
                        "test-set folder (LR/, highlevel_prompt/, lowlevel_prompt*/)")
    parser.add_argument("--output", required=True, help="output folder (PNG, same names)")
    parser.add_argument("--weights", required=True, help="XPSR release folder (unet/, controlnet/)")
    parser.add_argument("--sd15", help="SD 1.5 folder (vae/, text_encoder/, tokenizer/, scheduler/); "
                        "default: --weights when it has them")
    parser.add_argument("--captions", help="captions JSONL of xpsr_jax.captions, keyed by file stem")
    parser.add_argument("--caption-source", default="lr", choices=("lr", "hr"),
                        help="which image's captions to read from --captions (default: lr)")
    parser.add_argument("--highlevel-prompt", help="one high-level prompt (caption) for every image")
    parser.add_argument("--lowlevel-prompt", help="one low-level prompt (quality description) for every image")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    parser.add_argument("--coordinator-address", help="multi-process: host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    return parser


def list_inputs(path: Path) -> tuple[list[Path], Path | None]:
    """(files to process, the official-layout root or None). Every regular file of a folder is
    listed (non-images fail with a clear line); hidden files are ignored."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    root = path if is_official_layout(path) else None
    folder = path / OFFICIAL_LR_FOLDER if root is not None else path
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"--input {folder}: the folder holds no files")
    return files, root


def process_share(files: Sequence[Path], process_index: int, process_count: int) -> list[Path]:
    """This process's files: every process_count-th, so the shares have no overlap and no gap."""
    return list(files[process_index::process_count])


def load_lr(path: Path) -> np.ndarray:
    """The LR image as uint8 RGB (grey, RGBA, palette and 16-bit are converted); raises
    InputImageError with the reason."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputImageError(f"not an image file (extension {path.suffix or 'none'!r}; "
                              f"valid: {', '.join(IMAGE_SUFFIXES)})")
    try:
        image = read_rgb(path)
    except ImageReadError as error:
        raise InputImageError(f"unreadable image: {error.__cause__ or error}") from error
    if min(image.shape[:2]) < MIN_SIDE:
        raise InputImageError(f"image is {image.shape[1]}x{image.shape[0]} px; both sides must be at "
                              f"least {MIN_SIDE} px")
    return image


def _init_distributed(args) -> None:
    if args.num_processes > 1:
        # Inference needs no cross-process collectives, but CPU processes still need a
        # collectives backend to join a distributed run.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)


def run(args, config) -> int:
    output = Path(args.output)
    files, official_root = list_inputs(Path(args.input))
    files = process_share(files, jax.process_index(), jax.process_count())
    prompts = PromptSource(official_root=official_root, captions=args.captions, highlevel=args.highlevel_prompt,
                           lowlevel=args.lowlevel_prompt, caption_source=args.caption_source)
    failures: list[tuple[Path, str]] = []
    todo, skipped = [], 0
    for path in files:
        target = output / f"{path.stem}.png"
        if target.exists() and not args.overwrite:
            skipped += 1
            continue
        try:
            image = load_lr(path)
            highlevel, lowlevel = prompts.prompts(path)
            conditioning_shape = preprocess_lr(image, config.process_size, upscale=config.upscale).shape
        except (InputImageError, MissingPromptError, OSError, UnicodeDecodeError) as error:
            message = str(error)
            message = message if message.startswith(str(path)) else f"{path}: {message}"
            print(f"error: {message}", file=sys.stderr, flush=True)
            failures.append((path, message))
            continue
        todo.append(Job(path, target, image, highlevel, lowlevel, conditioning_shape))
    print(f"{len(files)} file(s) for this process, {skipped} already done, {len(todo)} to run, "
          f"{len(failures)} rejected; prompts from {prompts.describe()}", flush=True)
    if todo:
        pipe = XPSRPipeline.from_pretrained(args.weights, sd15=args.sd15, config=config)
        progress = tqdm(total=len(todo), unit="img", desc="super-resolving", disable=jax.process_index() != 0)
        start = time.perf_counter()
        for chunk in size_batches(todo, config.batch_size):
            images = pipe([item.image for item in chunk], [item.highlevel for item in chunk],
                          [item.lowlevel for item in chunk])
            for item, image in zip(chunk, images):
                write_png_atomic(item.target, image)
            progress.update(len(chunk))
            progress.set_postfix(img_per_s=f"{progress.n / (time.perf_counter() - start):.2f}")
        progress.close()
    return _summary(failures)


def size_batches(todo: Sequence["Job"], batch_size: int) -> list[list["Job"]]:
    """Jobs grouped by processed size (one compiled function each), in batches of `batch_size`."""
    groups: dict[tuple, list[Job]] = {}
    for job in todo:
        groups.setdefault(job.processed_shape, []).append(job)
    return [jobs[i:i + batch_size] for _, jobs in sorted(groups.items()) for i in range(0, len(jobs), batch_size)]


def _summary(failures) -> int:
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for _, message in failures:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        config, rest = parse_config_flags(argv, default=DEFAULT_CONFIG, prog=parser.prog)
    except ConfigFlagError as error:
        parser.error(str(error))
    args = parser.parse_args(rest)
    try:
        validate_infer_config(config)
        _init_distributed(args)
        return run(args, config)
    except (ValueError, FileNotFoundError, WeightsFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
