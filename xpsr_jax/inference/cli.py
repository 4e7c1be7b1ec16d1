"""`python -m xpsr_jax.infer` (or `python infer.py` in the repository): super-resolve a file or a folder.

    python -m xpsr_jax.infer --weights xpsr --sd15 sd15 --input LR_DIR --output OUT [--captions captions.jsonl]
    python -m xpsr_jax.infer ... --config infer.py:validation --config.num_inference_steps=25
    python -m xpsr_jax.models.tiny --out /tmp/tiny && python -m xpsr_jax.examples --out /tmp/samples
    python -m xpsr_jax.infer --weights /tmp/tiny/xpsr --sd15 /tmp/tiny/sd15 --input /tmp/samples \
        --output /tmp/sr --config infer.py:tiny

Every bad input (unreadable or non-image file, image under 8 px, missing prompt) gets one line
naming the file and the reason; the rest still run; a summary lists the failures and the exit
status is 1 if any failed. Outputs are written under a temporary name and renamed, and existing
outputs are skipped unless --overwrite. With --num-processes > 1 (one process per host, or
several on one machine) each process takes its share of the files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from ml_collections import config_dict
from PIL import Image

from xpsr_jax.captions.on_demand import caption_missing
from xpsr_jax.cli_config import (
    CommandParser,
    add_distributed_arguments,
    parse_command_line,
    report_error,
    split_config_args,
)
from xpsr_jax.compile_cache import DEFAULT as DEFAULT_CACHE
from xpsr_jax.compile_cache import use_compile_cache, user_cache_dir
from xpsr_jax.data.images import ImageReadError, image_size, read_rgb, write_png_atomic
from xpsr_jax.data.official_layout import LR_FOLDER, is_official_layout
from xpsr_jax.distributed import DistributedOptions, initialize_distributed
from xpsr_jax.files import IMAGE_SUFFIXES
from xpsr_jax.inference.artifact import (
    ARTIFACT_RUNTIME_KEYS,
    ArtifactRunner,
    check_artifact_covers,
    check_artifact_size,
    stablehlo_artifact_path,
)
from xpsr_jax.inference.batching import super_resolve_iter
from xpsr_jax.inference.config import validate_infer_config
from xpsr_jax.inference.pipeline import (
    WeightsFolderError,
    XPSRPipeline,
    check_pretrained,
    check_recipe_fits_weights,
)
from xpsr_jax.inference.preprocess import MIN_SIDE, InputImageError, check_input_size
from xpsr_jax.inference.prompts import MissingPromptError, PromptSource
from xpsr_jax.models.single_file import add_single_file_arguments
from xpsr_jax.progress import progress_bar
from xpsr_jax.weights.artifact import ArtifactInputError, load_artifact
from xpsr_jax.weights.formats import ONE_STEP_RECORD

DEFAULT_CONFIG = "configs/infer.py"  # the packaged inference config (xpsr_jax/configs/infer.py)


class Job(NamedTuple):
    path: Path
    target: Path
    image: np.ndarray
    highlevel: str
    lowlevel: str
    processed_shape: tuple


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m xpsr_jax.infer", description="XPSR super-resolution of an image or a folder.",
        epilog="Config: --config infer.py[:validation|tiny] and --config.KEY=VALUE overrides "
               "(see configs/infer.py).", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an image, a folder of images, or an official "
                        "test-set folder (LR/, highlevel_prompt/, lowlevel_prompt*/)")
    parser.add_argument("--output", required=True, help="output folder (PNGs named after the inputs); for a "
                        "single input image, a .png file name writes that file")
    parser.add_argument("--weights", required=True, help="an XPSR release folder (unet/, controlnet/), an orbax "
                        "inference checkpoint (python -m xpsr_jax.export orbax), or a StableHLO artifact "
                        "(python -m xpsr_jax.export stablehlo: used where it covers the recipe and the "
                        "images' processed sizes; without --config its own recipe is used)")
    parser.add_argument("--sd15", help="SD 1.5 folder (vae/, text_encoder/, tokenizer/, scheduler/), or the single "
                        "original-layout file (v1-5-pruned-emaonly.safetensors, .ckpt; converted once, cached); "
                        "default: --weights when it has them (not needed with a StableHLO artifact)")
    add_single_file_arguments(parser)
    parser.add_argument("--captions", help="captions JSONL of xpsr_jax.captions, keyed by file stem")
    parser.add_argument("--caption-source", default="lr", choices=("lr", "hr"),
                        help="which image's captions to read from --captions (default: lr)")
    parser.add_argument("--highlevel-prompt", help="one high-level prompt (caption) for every image")
    parser.add_argument("--lowlevel-prompt", help="one low-level prompt (quality description) for every image")
    parser.add_argument("--captioner", metavar="DIR", help="an image-text-to-text model folder (LLaVA-1.5 -hf): "
                        "images without a prompt from the other sources get both prompts from it, appended to "
                        "OUTPUT/captions.jsonl as they are made (a rerun reuses them); config captioner.*")
    parser.add_argument("--lowlevel-captioner", metavar="DIR", help="a second model for the low-level prompts "
                        "(e.g. Q-Instruct in the -hf format); default: --captioner answers both")
    parser.add_argument("--caption-transform", metavar="SPEC", help="what the captioner sees (never the SR "
                        "input), e.g. downscale:64,upscale:256 or gaussian_blur:2,jpeg:30")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    parser.add_argument("--config", metavar="FILE.py[:VARIANT]",
                        help="inference config (default configs/infer.py; variants validation, tiny); "
                             "--config.KEY=VALUE overrides one value, e.g. --config.num_inference_steps=25")
    add_distributed_arguments(parser)  # each process takes every N-th file
    return parser


def list_inputs(path: Path) -> tuple[list[Path], Path | None]:
    """(files to process, the official-layout root or None). Every regular file of a folder is
    listed (non-images fail with a clear line), broken links too (they fail and are counted);
    hidden files are ignored."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    root = path if is_official_layout(path) else None
    folder = path / LR_FOLDER if root is not None else path
    files = sorted(p for p in folder.iterdir()
                   if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith("."))
    check_distinct_stems(files)
    if not files:
        raise FileNotFoundError(f"--input {folder}: the folder holds no files")
    return files, root


def check_distinct_stems(files: Sequence[Path]) -> None:
    """Outputs are named STEM.png (and prompts keyed by stem), so `a.jpg` and `a.png` would write
    one result over the other: refuse up front, naming every clash (ValueError)."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        shown = "; ".join(f"{' and '.join(p.name for p in paths)} -> {paths[0].stem}.png" for paths in clashes[:10])
        more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
        raise ValueError(f"--input {files[0].parent}: {len(clashes)} output name(s) would be written by more than "
                         f"one input (outputs are named after the file stem): {shown}{more}; rename or move one "
                         "file of each pair")


def output_paths(output: Path, files: Sequence[Path]) -> list[Path]:
    """Where each input's PNG goes: OUTPUT/STEM.png, or OUTPUT itself when it names a .png file
    and there is one input. An --output that looks like an image file for a folder of inputs (or
    with another image suffix) is refused rather than made into a folder of that name."""
    if output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir():
        if output.suffix.lower() == ".png" and len(files) == 1:
            return [output]
        what = f"{len(files)} inputs" if len(files) != 1 else "the input"
        raise ValueError(f"--output {output}: looks like an image file name; outputs are PNGs, so give a folder "
                         f"for {what}" + (" (or a .png file name for one input)" if len(files) == 1 else ""))
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: exists and is not a folder")
    return [output / f"{path.stem}.png" for path in files]


def is_finished_output(path: Path) -> bool:
    """An existing output counts as done only if it decodes (a zero-byte or torn file is redone)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def process_share(files: Sequence[Path], process_index: int, process_count: int) -> list[Path]:
    """This process's files: every process_count-th, so the shares have no overlap and no gap."""
    return list(files[process_index::process_count])


def load_lr(path: Path, *, apply_exif_orientation: bool = True, config=None) -> np.ndarray:
    """The LR image as uint8 RGB (grey, RGBA, palette and 16-bit are converted); raises
    InputImageError with the reason. With `config`, an input whose result would be over
    max_output_pixels is refused from the file's header, before it is decoded."""
    if path.is_symlink() and not path.exists():
        raise InputImageError(f"broken link to {os.readlink(path)}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputImageError(f"not an image file (extension {path.suffix or 'none'!r}; "
                              f"valid: {', '.join(IMAGE_SUFFIXES)})")
    try:
        if config is not None:
            check_input_size(image_size(path, apply_exif_orientation=apply_exif_orientation), config)
        image = read_rgb(path, apply_exif_orientation=apply_exif_orientation)
    except ImageReadError as error:
        raise InputImageError(f"unreadable image: {error.__cause__ or error}") from error
    if min(image.shape[:2]) < MIN_SIDE:
        raise InputImageError(f"image is {image.shape[1]}x{image.shape[0]} px; both sides must be at "
                              f"least {MIN_SIDE} px")
    return image


def _init_distributed(args) -> None:
    initialize_distributed(DistributedOptions.from_args(args))


def run(args, config, artifact=None) -> int:
    """`artifact`: a loaded StableHLO artifact to sample with instead of the pipeline."""
    if artifact is None:  # one-step weights with a sampling recipe (or the reverse): refused before any work
        check_recipe_fits_weights(config, (Path(args.weights) / ONE_STEP_RECORD).is_file(), args.weights)
    output = Path(args.output)
    files, official_root = list_inputs(Path(args.input))
    targets = dict(zip(files, output_paths(output, files)))
    files = process_share(files, jax.process_index(), jax.process_count())
    prompts = PromptSource(official_root=official_root, captions=args.captions, highlevel=args.highlevel_prompt,
                           lowlevel=args.lowlevel_prompt, caption_source=args.caption_source)
    where = output if len(targets) != 1 or output.suffix.lower() != ".png" else output.parent
    if config.get("captioner") is not None and config.captioner.model:
        if artifact is None:  # bad weights are named before the captioning, not after it
            check_pretrained(args.weights, args.sd15, tokenizer=args.tokenizer, sd15_config=args.sd15_config)
        caption_on_the_fly(files, targets, prompts, config, where, args.overwrite)
    failures: list[tuple[Path, str]] = []
    todo, skipped = [], 0
    redone = 0
    for path in files:
        target = targets[path]
        if target.exists() and not args.overwrite:
            if is_finished_output(target):
                skipped += 1
                continue
            redone += 1
            print(f"note: {target} exists but does not decode as an image; redoing it", file=sys.stderr, flush=True)
        try:
            image = load_lr(path, apply_exif_orientation=config.apply_exif_orientation, config=config)
            highlevel, lowlevel = prompts.prompts(path)
            conditioning_shape = check_input_size(image.shape, config)
            if artifact is not None:
                check_artifact_size(artifact, conditioning_shape)
        except (InputImageError, MissingPromptError, ArtifactInputError, OSError, UnicodeDecodeError) as error:
            message = str(error)
            message = message if message.startswith(str(path)) else f"{path}: {message}"
            print(f"error: {message}", file=sys.stderr, flush=True)
            failures.append((path, message))
            continue
        todo.append(Job(path, target, image, highlevel, lowlevel, conditioning_shape))
    print(f"{len(files)} file(s) for this process, {skipped} already done, {len(todo)} to run, "
          f"{len(failures)} rejected; prompts from {prompts.describe()}", flush=True)
    written = 0
    if todo:
        check_output_folder(targets[todo[0].path].parent, first_output_bytes(todo, config))  # before the load
        pipe = ArtifactRunner(artifact, config) if artifact is not None else \
            XPSRPipeline.from_pretrained(args.weights, sd15=args.sd15, config=config, tokenizer=args.tokenizer,
                                         sd15_config=args.sd15_config)
        progress = progress_bar(total=len(todo), unit="img", desc="super-resolving",
                                disable=jax.process_index() != 0)
        pipe.on_compile = (lambda line: progress.write(line, file=sys.stdout)) if jax.process_index() == 0 else None
        start = time.perf_counter()

        def failed(indices, error):  # too large for the device, or sampled non-finite
            for index in indices:
                message = f"{todo[index].path}: {error}"
                progress.write(f"error: {message}", file=sys.stderr)
                failures.append((todo[index].path, message))
            progress.update(len(indices))

        try:
            for index, image in super_resolve_iter(pipe, [job.image for job in todo],
                                                   [job.highlevel for job in todo], [job.lowlevel for job in todo],
                                                   on_failure=failed):
                try:
                    write_png_atomic(todo[index].target, image)
                except OSError as error:  # disk full, folder removed, ...: stop; a rerun resumes
                    raise OutputWriteError(f"writing {todo[index].target} failed ({error.strerror or error}); "
                                           f"stopped after {written} image(s); the rerun of the same command "
                                           "keeps them and does the rest") from error
                written += 1
                progress.update(1)
                # The rate leaves the compiles out: the first image is not 50 s/img.
                sampling = time.perf_counter() - start - getattr(pipe, "compile_seconds", 0.0)
                progress.set_postfix(img_per_s=f"{written / max(sampling, 1e-9):.2f}")
        finally:
            progress.close()
    print(f"wrote {written} image(s) to {where}" + (f" ({redone} redone)" if redone else "")
          + (f"; {skipped} already there" if skipped else "")
          + (f"; {len(failures)} failed" if failures else ""), flush=True)
    return _summary(failures)


def apply_captioner_flags(args, config) -> None:
    for flag, key in (("captioner", "model"), ("lowlevel_captioner", "lowlevel_model"),
                      ("caption_transform", "caption_transform")):
        if getattr(args, flag) is not None:
            config.captioner[key] = getattr(args, flag)
    if config.captioner.lowlevel_model and not config.captioner.model:
        raise ValueError("--lowlevel-captioner needs --captioner (the model for the high-level prompts)")


def captions_path(folder: Path) -> Path:
    """Where captions made on the fly go: OUTPUT/captions.jsonl (one file per process when several run)."""
    if jax.process_count() > 1:
        return folder / f"captions.process-{jax.process_index()}-of-{jax.process_count()}.jsonl"
    return folder / "captions.jsonl"


def caption_on_the_fly(files, targets, prompts: PromptSource, config, folder: Path, overwrite: bool) -> None:
    """Captions from config.captioner's model(s) for every image still to do that no other source
    has a prompt for; unreadable images and prompt files are left to the main loop's per-file errors."""
    wanted: dict[str, list[Path]] = {"highlevel": [], "lowlevel": []}
    for path in files:
        target = targets[path]
        if target.exists() and not overwrite and is_finished_output(target):
            continue
        try:
            load_lr(path, apply_exif_orientation=config.apply_exif_orientation)
            missing = prompts.missing_kinds(path)
        except (InputImageError, OSError, UnicodeDecodeError):  # e.g. a prompt file that is not UTF-8
            continue
        for kind in missing:
            wanted[kind].append(path)
    if not any(wanted.values()):
        return
    captioner = config.captioner
    path = captions_path(folder)
    result = caption_missing(
        wanted, output=path, model=captioner.model, lowlevel_model=captioner.lowlevel_model,
        caption_transform=captioner.caption_transform, question_preset=captioner.question_preset,
        batch_size=captioner.batch_size, max_new_tokens=captioner.max_new_tokens, dtype=captioner.dtype,
        device=captioner.device or None, log=lambda line: print(line, flush=True),
        progress=lambda total, desc: progress_bar(total=total, unit="img", desc=desc,
                                                  disable=jax.process_index() != 0))
    prompts.add_made_captions(result.captions)
    print(f"captions: {result.made} made, {result.reused} reused ({path})", flush=True)


class OutputWriteError(RuntimeError):
    """An output that could not be written mid-run; the message names it and how to resume."""


def first_output_bytes(todo: Sequence[Job], config) -> int:
    """An upper bound of the first batch's PNGs (uncompressed RGB at the output size)."""
    first = todo[: config.batch_size]
    return sum(3 * (config.upscale * job.image.shape[0]) * (config.upscale * job.image.shape[1]) for job in first)


def check_output_folder(folder: Path, needed_bytes: int) -> None:
    """The output folder exists or can be made, takes a file, and has room for the first outputs:
    checked before any model is loaded (ValueError naming the folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--output {folder}: cannot be a folder: a file is in the way "
                         f"({next(p for p in [folder, *folder.parents] if p.exists() and not p.is_dir())})") from None
    except OSError as error:
        raise ValueError(f"--output {folder}: cannot create the folder ({error.strerror or error})") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--output {folder}: cannot write there ({error.strerror or error})") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ValueError(f"--output {folder}: {free / 2**20:.1f} MiB free, the first outputs need up to "
                         f"{needed_bytes / 2**20:.1f} MiB")


def _summary(failures) -> int:
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for _, message in failures:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config, args = parse_command_line(build_parser(), argv, default=DEFAULT_CONFIG)
    try:
        artifact = None
        if stablehlo_artifact_path(args.weights) is not None:
            artifact = load_artifact(args.weights)
            if not split_config_args(argv)[0]:  # no --config flags: the artifact's own recipe
                recipe = config_dict.ConfigDict(artifact.config)
                for key in ARTIFACT_RUNTIME_KEYS:  # host-side settings an older artifact may not record
                    if key not in recipe:
                        recipe[key] = config[key]
                config = recipe
                config.lock()
            if args.sd15:
                print(f"note: --sd15 is not used: the StableHLO artifact {args.weights} holds every network",
                      flush=True)
        apply_captioner_flags(args, config)
        validate_infer_config(config)
        use_compile_cache(config.get("compile_cache", DEFAULT_CACHE), user_cache_dir())
        if artifact is not None:
            check_artifact_covers(artifact, config)
        _init_distributed(args)
        return run(args, config, artifact)
    except (ValueError, FileNotFoundError, WeightsFolderError, OutputWriteError) as error:
        report_error(error)
        return 2
