"""`python -m xpsr_jax.data.prepare`: HR images -> XPSR training dataset, stage by stage.

Stages (select with ``--stages``, default all three; each one resumes where it stopped):

1. ``crop``: every HR image under ``--hr-dir`` (recursive, sorted) -> ``--crop-size`` crops
   (``random``: ``--crops-per-image`` positions; ``grid``: every non-overlapping tile, centred)
   -> Real-ESRGAN degradation -> ``work_dir/HR/{id}.png``, ``work_dir/LR/{id}.png`` and
   ``work_dir/degradation.jsonl``. The HR image stored is the USM-sharpened crop
   (``--hr-target usm``, the official make_train.py) or the crop itself (``original``).
   Unreadable or too-small files are skipped and listed in ``work_dir/skipped.txt``. Crop
   positions come from ``(--seed, image index)``, the degradation from ``(--seed, image index
   * 65536 + crop index)``: the same input file list and seed give the same dataset.
2. ``caption``: ``python -m xpsr_jax.captions`` for the high-level (``--highlevel-model``,
   LLaVA-1.5) and low-level (``--lowlevel-model``, Q-Instruct) prompts of every LR and HR
   crop -> ``work_dir/captions.jsonl``. With ``--captions FILE`` (computed elsewhere) nothing
   is run; the file is checked and used by the build.
3. ``build``: the TFDS dataset ``xpsr_pairs/prepared`` in ``--data-dir``
   (``--build-parts N`` parts in ``--build-processes P`` processes, merged at the end).

Examples::

    python -m xpsr_jax.data.prepare --hr-dir DIV2K_train_HR --work-dir work --data-dir tfds \\
        --highlevel-model /models/llava-1.5-7b-hf --lowlevel-model /models/qinstruct \\
        --crop-mode grid --num-workers 16 --build-parts 16 --build-processes 16
    # captions made on a GPU box: only crop here, then build with the file
    python -m xpsr_jax.data.prepare --stages crop --hr-dir HR --work-dir work
    python -m xpsr_jax.data.prepare --stages build --work-dir work --data-dir tfds \\
        --captions captions.jsonl
    # several machines on one file system: part I of N each, then one merge
    python -m xpsr_jax.data.prepare --stages build ... --build-parts 8 --build-part I
    python -m xpsr_jax.data.prepare --stages build ... --build-parts 8
    # defaults from a config file (big_vision style), flags still win
    python -m xpsr_jax.data.prepare --config configs/data.py:tiny --hr-dir HR ...

Public API: ``main(argv) -> int``, ``default_prepare_config()``, ``run_crop_stage``,
``run_caption_stage``, ``run_build_stage``, ``crop_boxes``, ``list_hr_images``,
``hr_target_image``, ``HR_TARGETS``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from ml_collections import config_dict

from xpsr_jax.captions.cli import main as captions_main
from xpsr_jax.captions.config import TASKS
from xpsr_jax.captions.io import SOURCES, CaptionWriter, load_captions
from xpsr_jax.cli_config import CommandParser, ConfigFlagError, load_config_file
from xpsr_jax.data import images, tfds_builder
from xpsr_jax.data.degradation import (
    default_degradation_config,
    degrade,
    to_uint8,
    usm_sharpen,
    validate_degradation_config,
)
from xpsr_jax.files import image_files, write_bytes_atomic
from xpsr_jax.progress import progress_bar

STAGES = ("crop", "caption", "build")
CROP_MODES = ("random", "grid")
SKIPPED_FILE = "skipped.txt"
SETTINGS_FILE = tfds_builder.PREPARE_SETTINGS_FILE
HR_TARGETS = tfds_builder.HR_TARGETS  # ("usm", "original")
PARAMS_DIR = "degradation"  # one {id}.json per crop; merged into degradation.jsonl
MAX_CROPS_PER_IMAGE = 65536  # degradation example_id = image index * this + crop index


class PrepareError(ValueError):
    """Bad input or state for `prepare`; the message names the option / file."""


def default_prepare_config() -> config_dict.ConfigDict:
    """Defaults of `python -m xpsr_jax.data.prepare` (locked ConfigDict)."""
    config = config_dict.ConfigDict()
    config.hr_dir = config_dict.placeholder(str)
    config.work_dir = config_dict.placeholder(str)
    config.data_dir = config_dict.placeholder(str)
    config.stages = ",".join(STAGES)
    config.crop_size = 512
    config.crop_mode = "random"
    config.crops_per_image = 1  # random mode only
    config.seed = 0
    # The HR image stored (the training target): "usm" = the crop USM-sharpened with the
    # degradation's usm.* settings, as the official make_train.py saves it (Real-ESRGAN's
    # gt_usm); "original" = the crop itself.
    config.hr_target = "usm"
    config.num_workers = 1  # crop-stage processes; 1: in this process
    config.captions = config_dict.placeholder(str)  # precomputed captions JSONL
    # True: no caption model; every prompt is the empty string (the released training script
    # feeds an empty high-level prompt; the low-level one empty too). For a first run on your
    # own photos before any MLLM is set up.
    config.empty_prompts = False
    config.highlevel_model = config_dict.placeholder(str)  # LLaVA-1.5 folder
    config.lowlevel_model = config_dict.placeholder(str)  # Q-Instruct folder
    config.caption_batch_size = 8
    config.caption_max_new_tokens = 200  # the caption command's default
    config.build_parts = 1
    config.build_processes = 1
    config.build_part = config_dict.placeholder(int)  # build only this part, no merge
    config.shards_per_part = config_dict.placeholder(int)  # None: by size (tfds default)
    config.lock()
    return config


# ----------------------------------------------------------------------------- crop stage


def list_hr_images(hr_dir: str | os.PathLike) -> list[Path]:
    """Image files under `hr_dir`, recursively, sorted by relative path (fixes the indices)."""
    return image_files(hr_dir, "--hr-dir", recursive=True, error=PrepareError)


def image_base_id(relative_path: str) -> str:
    """'sub/0001.png' -> 'sub__0001': a flat file name (the captions use the file stem)."""
    stem = relative_path.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem.replace("/", "__"))


def crop_boxes(height: int, width: int, crop_size: int, mode: str, crops_per_image: int,
               rng: np.random.Generator) -> list[tuple[int, int]]:
    """crop_boxes(height, width, crop_size, mode, crops_per_image, rng) -> [(top, left), ...].

    "random": `crops_per_image` uniform positions; "grid": all non-overlapping tiles,
    the grid centred in the image. Needs height, width >= crop_size.
    """
    if mode == "random":
        return [(int(rng.integers(0, height - crop_size + 1)),
                 int(rng.integers(0, width - crop_size + 1))) for _ in range(crops_per_image)]
    rows, cols = height // crop_size, width // crop_size
    top0, left0 = (height - rows * crop_size) // 2, (width - cols * crop_size) // 2
    return [(top0 + r * crop_size, left0 + c * crop_size) for r in range(rows) for c in range(cols)]


@dataclasses.dataclass(frozen=True)
class CropTask:
    """Everything one worker needs to crop and degrade one HR image."""

    image_index: int
    path: str
    relative_path: str
    work_dir: str
    crop_size: int
    crop_mode: str
    crops_per_image: int
    seed: int
    degradation_config: config_dict.ConfigDict
    hr_target: str = "usm"


@dataclasses.dataclass(frozen=True)
class CropResult:
    relative_path: str
    written: int = 0
    reused: int = 0
    skip_reason: str | None = None


def hr_target_image(hr_crop: np.ndarray, hr_target: str, degradation_config) -> np.ndarray:
    """hr_target_image(hr_crop, hr_target, degradation_config) -> the uint8 HR image to store.

    "usm": the crop sharpened by the USM that `degrade()` applies before degrading
    (`degradation_config.usm.radius/weight/threshold`; used whatever `usm.apply` says),
    rounded to uint8; "original": the crop unchanged.
    """

    check_hr_target(hr_target)
    if hr_target == "original":
        return hr_crop
    usm = degradation_config.usm
    sharpened = usm_sharpen(hr_crop.astype(np.float32) / 255.0, radius=usm.radius,
                            weight=usm.weight, threshold=usm.threshold)
    return to_uint8(sharpened)


def check_hr_target(hr_target) -> None:
    if hr_target not in HR_TARGETS:
        raise PrepareError(f"prepare.hr_target (--hr-target) = {hr_target!r}: valid are 'usm' (the "
                           "USM-sharpened crop, the official default) or 'original' (the crop)")


def crop_and_degrade(task: CropTask) -> CropResult:
    """Writes the crops of one image that are not on disk yet; never raises for bad images.

    Per crop: HR png, then params json, then LR png, each atomic; the LR png marks the crop
    done, so a killed run redoes at most the crops in flight.
    """

    work_dir = Path(task.work_dir)
    try:
        height, width = images.image_size(task.path)
    except images.ImageReadError as error:
        return CropResult(task.relative_path, skip_reason=f"unreadable: {error}")
    if min(height, width) < task.crop_size:
        return CropResult(task.relative_path, skip_reason=(
            f"too small: {width}x{height} < crop size {task.crop_size}"))
    rng = np.random.default_rng([task.seed, task.image_index])
    boxes = crop_boxes(height, width, task.crop_size, task.crop_mode, task.crops_per_image, rng)
    if len(boxes) > MAX_CROPS_PER_IMAGE:
        return CropResult(task.relative_path, skip_reason=f"more than {MAX_CROPS_PER_IMAGE} crops")
    base_id = image_base_id(task.relative_path)
    crop_ids = [f"{base_id}_{k:03d}" for k in range(len(boxes))]
    todo = [k for k, crop_id in enumerate(crop_ids) if not _crop_done(work_dir, crop_id)]
    if not todo:
        return CropResult(task.relative_path, reused=len(boxes))
    try:
        hr_image = images.read_rgb(task.path)
    except images.ImageReadError as error:
        return CropResult(task.relative_path, skip_reason=f"unreadable: {error}")
    if hr_image.shape[:2] != (height, width):
        return CropResult(task.relative_path, skip_reason=(
            f"header says {width}x{height}, pixels are {hr_image.shape[1]}x{hr_image.shape[0]}"))
    for k in todo:
        top, left = boxes[k]
        size = task.crop_size
        hr_crop = np.ascontiguousarray(hr_image[top:top + size, left:left + size])
        # The LR comes from the crop: degrade() sharpens it itself when usm.apply is set.
        lr_crop, params = degrade(hr_crop, task.degradation_config, seed=task.seed,
                                  example_id=task.image_index * MAX_CROPS_PER_IMAGE + k)
        hr_stored = hr_target_image(hr_crop, task.hr_target, task.degradation_config)
        record = {"image_id": crop_ids[k], "source_file": task.relative_path,
                  "crop": [top, left, task.crop_size], "seed": task.seed,
                  "example_id": task.image_index * MAX_CROPS_PER_IMAGE + k, "params": params}
        images.write_png_atomic(work_dir / "HR" / f"{crop_ids[k]}.png", hr_stored)
        write_bytes_atomic(work_dir / PARAMS_DIR / f"{crop_ids[k]}.json",
                                  json.dumps(record).encode("utf-8"))
        images.write_png_atomic(work_dir / "LR" / f"{crop_ids[k]}.png", lr_crop)
    return CropResult(task.relative_path, written=len(todo), reused=len(boxes) - len(todo))


def _crop_done(work_dir: Path, crop_id: str) -> bool:
    return all((work_dir / folder / f"{crop_id}{suffix}").is_file()
               for folder, suffix in (("HR", ".png"), (PARAMS_DIR, ".json"), ("LR", ".png")))


def _check_settings(work_dir: Path, settings: dict) -> None:
    """A work folder holds crops of one setting only; mixing would give a silent mess."""
    path = work_dir / SETTINGS_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        # Folders cropped before hr_target existed hold the unsharpened crop.
        previous.setdefault("hr_target", "original")
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            detail = ", ".join(f"{key}: {old!r} before, {new!r} now"
                               for key, (old, new) in changed.items())
            raise PrepareError(
                f"{work_dir} was cropped with other settings ({detail}); use a new --work-dir "
                "or the same settings"
            )
    else:
        write_bytes_atomic(path, json.dumps(settings, indent=1).encode("utf-8"))


def _map_tasks(function, tasks: Sequence, num_workers: int) -> Iterable:
    if num_workers <= 1:
        return map(function, tasks)
    # spawn: forking a process that may hold JAX/grain threads is unsafe.
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn"))
    return _drain(pool, pool.map(function, tasks, chunksize=4))


def _drain(pool, results):
    with pool:
        yield from results


def run_crop_stage(config: config_dict.ConfigDict, degradation_config=None) -> dict:
    """run_crop_stage(config, degradation_config=None) -> counts
    {"images", "written", "reused", "skipped"}. Writes HR/, LR/, degradation.jsonl, skipped.txt."""

    degradation_config = degradation_config or default_degradation_config()
    validate_degradation_config(degradation_config)
    _require(config, "hr_dir", "work_dir")
    if config.crop_mode not in CROP_MODES:
        raise PrepareError(f"--crop-mode {config.crop_mode!r}: valid are {', '.join(CROP_MODES)}")
    check_hr_target(config.hr_target)
    scale = degradation_config.scale
    if config.crop_size < 4 * scale or config.crop_size % scale:
        raise PrepareError(f"--crop-size {config.crop_size} must be a multiple of the scale "
                           f"{scale} and at least {4 * scale}")
    if config.crop_mode == "random" and not 1 <= config.crops_per_image <= MAX_CROPS_PER_IMAGE:
        raise PrepareError(f"--crops-per-image {config.crops_per_image} must be in "
                           f"[1, {MAX_CROPS_PER_IMAGE}]")
    work_dir, hr_dir = Path(config.work_dir), Path(config.hr_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(work_dir, {
        "hr_dir": str(hr_dir.resolve()), "crop_size": config.crop_size,
        "crop_mode": config.crop_mode, "seed": config.seed,
        "crops_per_image": config.crops_per_image if config.crop_mode == "random" else None,
        "hr_target": config.hr_target,
        "degradation": json.loads(degradation_config.to_json()),
    })
    _remove_stale_temp_files(work_dir)
    paths = list_hr_images(hr_dir)
    base_ids = {}
    for path in paths:
        relative = path.relative_to(hr_dir).as_posix()
        other = base_ids.setdefault(image_base_id(relative), relative)
        if other != relative:
            raise PrepareError(f"{other} and {relative} map to the same image id "
                               f"{image_base_id(relative)!r}; rename one")
    tasks = [CropTask(index, str(path), path.relative_to(hr_dir).as_posix(), str(work_dir),
                      config.crop_size, config.crop_mode, config.crops_per_image, config.seed,
                      degradation_config, config.hr_target) for index, path in enumerate(paths)]
    counts = {"images": len(tasks), "written": 0, "reused": 0, "skipped": 0}
    skipped = []
    progress = progress_bar(_map_tasks(crop_and_degrade, tasks, config.num_workers), total=len(tasks),
                            desc="crop + degrade", unit="img", dynamic_ncols=True)
    for result in progress:
        counts["written"] += result.written
        counts["reused"] += result.reused
        if result.skip_reason:
            skipped.append((result.relative_path, result.skip_reason))
            progress_bar.write(f"skipped {result.relative_path}: {result.skip_reason}")
    counts["skipped"] = len(skipped)
    write_bytes_atomic(work_dir / SKIPPED_FILE, "".join(
        f"{path}\t{reason}\n" for path, reason in skipped).encode("utf-8"))
    _write_degradation_jsonl(work_dir)
    print(f"crop: {counts['images']} images, {counts['written']} crops written, "
          f"{counts['reused']} already there, {counts['skipped']} images skipped "
          f"(listed in {work_dir / SKIPPED_FILE})")
    return counts


def _remove_stale_temp_files(work_dir: Path) -> None:
    """Temp files of writes a killed run left behind (write_bytes_atomic names them .*.tmp)."""
    for folder in ("HR", "LR", PARAMS_DIR):
        for path in (work_dir / folder).glob(".*.tmp"):
            path.unlink(missing_ok=True)


def _write_degradation_jsonl(work_dir: Path) -> None:
    """Merges the per-crop records of crops whose LR exists into degradation.jsonl, atomically."""
    lines = []
    for params_path in sorted((work_dir / PARAMS_DIR).glob("*.json")):
        if (work_dir / "LR" / f"{params_path.stem}.png").is_file():
            lines.append(json.dumps(json.loads(params_path.read_bytes())) + "\n")
    write_bytes_atomic(work_dir / tfds_builder.DEGRADATION_FILE,
                              "".join(lines).encode("utf-8"))


# ----------------------------------------------------------------------------- caption stage


def missing_caption_tasks(captions_path: Path, image_ids: Sequence[str]) -> dict[str, int]:
    """{task: number of (image, source) pairs without a caption} for tasks with gaps."""

    captions = load_captions(captions_path) if captions_path.is_file() else {}
    missing = {}
    for task in ("highlevel", "lowlevel"):
        count = sum((image_id, source, task) not in captions
                    for image_id in image_ids for source in ("lr", "hr"))
        if count:
            missing[task] = count
    return missing


def run_caption_stage(config: config_dict.ConfigDict) -> Path:
    """run_caption_stage(config) -> captions file covering every crop in work_dir/HR."""
    _require(config, "work_dir")
    work_dir = Path(config.work_dir)
    image_ids = sorted(p.stem for p in (work_dir / "HR").glob("*.png"))
    if not image_ids:
        raise PrepareError(f"{work_dir / 'HR'} holds no crops: run the 'crop' stage first")
    if config.captions:
        captions_path = Path(config.captions)
        if not captions_path.is_file():
            raise PrepareError(f"--captions {captions_path} does not exist")
        missing = missing_caption_tasks(captions_path, image_ids)
        if missing:
            raise PrepareError(f"--captions {captions_path} lacks captions: {missing} "
                               "(image, source) pairs per task")
        print(f"caption: using precomputed {captions_path}")
        return captions_path

    captions_path = work_dir / tfds_builder.CAPTIONS_FILE
    missing = missing_caption_tasks(captions_path, image_ids)
    if not missing:
        print(f"caption: {captions_path} already covers all {len(image_ids)} crops")
        return captions_path
    if config.empty_prompts:
        known = load_captions(captions_path) if captions_path.is_file() else {}
        records = [{"image_id": image_id, "source": source, "task": task, "text": "",
                    "model": "none (--empty-prompts)", "question": ""}
                   for image_id in image_ids for source in SOURCES for task in TASKS
                   if (image_id, source, task) not in known]
        with CaptionWriter(captions_path) as writer:
            writer.write(records)
        print(f"caption: {len(records)} empty prompts written to {captions_path} (--empty-prompts)")
        return captions_path

    for task, model_key in (("highlevel", "highlevel_model"), ("lowlevel", "lowlevel_model")):
        if task not in missing:
            continue
        if not config[model_key]:
            raise PrepareError(
                f"{missing[task]} {task} captions are missing: pass "
                f"--{model_key.replace('_', '-')} (a local model folder), --captions FILE or --empty-prompts"
            )
        argv = ["--task", task, "--model", config[model_key],
                "--lr-dir", str(work_dir / "LR"), "--hr-dir", str(work_dir / "HR"),
                "--output", str(captions_path), "--batch-size", str(config.caption_batch_size),
                "--max-new-tokens", str(config.caption_max_new_tokens)]
        try:
            status = captions_main(argv)
        except SystemExit as exit_:  # argparse-style errors of the caption command
            status = exit_.code
        if status:
            raise PrepareError(f"caption command failed (exit status {status}): "
                               f"python -m xpsr_jax.captions {' '.join(argv)}")
    missing = missing_caption_tasks(captions_path, image_ids)
    if missing:
        raise PrepareError(f"{captions_path} still lacks captions after captioning: {missing}")
    return captions_path


# ----------------------------------------------------------------------------- build stage


def run_build_stage(config: config_dict.ConfigDict) -> Path | None:
    """run_build_stage(config) -> dataset folder (None when only one part was built)."""
    _require(config, "work_dir", "data_dir")
    captions = config.captions or None
    for key in ("build_parts", "build_processes"):
        if config[key] < 1:
            raise PrepareError(f"--{key.replace('_', '-')} {config[key]} must be >= 1")
    if config.build_part is not None and not 0 <= config.build_part < config.build_parts:
        raise PrepareError(f"--build-part {config.build_part} must be in "
                           f"[0, --build-parts {config.build_parts})")
    if config.build_part is not None:
        path = tfds_builder.build_part(
            config_name="prepared", source_dir=config.work_dir, data_dir=config.data_dir,
            part_index=config.build_part, num_parts=config.build_parts, captions_path=captions,
            shards_per_part=config.shards_per_part)
        print(f"build: part {config.build_part} of {config.build_parts} is in {path}; run "
              f"--stages build --build-parts {config.build_parts} to merge")
        return None
    if tfds_builder.is_built(config.data_dir, "prepared"):
        print(f"build: {tfds_builder.dataset_dir(config.data_dir, 'prepared')} exists, kept")
        return tfds_builder.dataset_dir(config.data_dir, "prepared")
    path = tfds_builder.build_dataset(
        config_name="prepared", source_dir=config.work_dir, data_dir=config.data_dir,
        captions_path=captions, num_parts=config.build_parts,
        num_processes=config.build_processes, shards_per_part=config.shards_per_part)
    print(f"build: dataset written to {path}")
    return path


# ----------------------------------------------------------------------------- command line


def _require(config: config_dict.ConfigDict, *keys: str) -> None:
    for key in keys:
        if not config[key]:
            raise PrepareError(f"--{key.replace('_', '-')} is required for the selected stages")


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise PrepareError(f"--stages {text!r}: valid stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]  # always in pipeline order


def build_parser() -> argparse.ArgumentParser:
    defaults = default_prepare_config()
    parser = CommandParser(
        prog="python -m xpsr_jax.data.prepare",
        description="HR images -> crops + Real-ESRGAN LR -> MLLM prompts -> TFDS dataset.",
        epilog=__doc__.split("Examples::")[1].split("Public API")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="python config file[:arg] with get_config() holding "
                        "'prepare' (and optionally 'degradation') fields, e.g. configs/data.py")
    add = parser.add_argument
    add("--stages", help=f"comma list of {', '.join(STAGES)} (default: {defaults.stages})")
    add("--hr-dir", help="folder of HR images (searched recursively)")
    add("--work-dir", help="folder for HR/, LR/, degradation.jsonl, captions.jsonl, skipped.txt")
    add("--data-dir", help="TFDS data_dir to build xpsr_pairs/prepared into")
    add("--crop-size", type=int, help=f"HR crop side (default: {defaults.crop_size})")
    add("--crop-mode", choices=CROP_MODES, help=f"default: {defaults.crop_mode}")
    add("--crops-per-image", type=int,
        help=f"random mode: crops per HR image (default: {defaults.crops_per_image})")
    add("--seed", type=int, help=f"crop + degradation seed (default: {defaults.seed})")
    add("--hr-target", choices=HR_TARGETS,
        help=f"HR image stored: usm = USM-sharpened crop (official), original = the crop "
             f"(default: {defaults.hr_target})")
    add("--num-workers", type=int, help="crop-stage processes (default: 1, in this process)")
    add("--captions", help="precomputed captions JSONL (format: docs/data.md); the caption stage then runs no model")
    add("--empty-prompts", action="store_true", default=None,
        help="no caption model: every prompt is empty (as the released training script's high-level one)")
    add("--highlevel-model", help="local LLaVA-1.5 folder for the high-level prompts")
    add("--lowlevel-model", help="local Q-Instruct model folder for the low-level prompts")
    add("--caption-batch-size", type=int,
        help=f"images per caption generate call (default: {defaults.caption_batch_size})")
    add("--caption-max-new-tokens", type=int,
        help=f"caption length limit in tokens (default: {defaults.caption_max_new_tokens})")
    add("--build-parts", type=int, help="split the build into N parts (default: 1)")
    add("--build-processes", type=int, help="parts built at once on this machine (default: 1)")
    add("--build-part", type=int, help="build only part I of --build-parts (no merge)")
    add("--shards-per-part", type=int, help="array_record shards per part (default: by size)")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[config_dict.ConfigDict, object]:
    """(prepare config, degradation config or None): defaults < --config file < flags."""
    config = default_prepare_config()
    degradation_config = None
    if args.config:
        try:
            loaded = load_config_file(args.config)
        except ConfigFlagError as error:
            raise PrepareError(str(error)) from error
        if "prepare" not in loaded:
            raise PrepareError(f"--config {args.config}: get_config() has no 'prepare' field")
        for key, value in loaded.prepare.items():
            if key not in config:
                raise PrepareError(f"--config {args.config}: unknown prepare key {key!r}; "
                                   f"valid: {', '.join(sorted(config.keys()))}")
            config[key] = value
        degradation_config = loaded.get("degradation")
    for key in config:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    return config, degradation_config


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected stages; bad input exits with status 2 and a message naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, degradation_config = config_from_args(args)
        stages = parse_stages(config.stages)
        if "crop" in stages:
            run_crop_stage(config, degradation_config)
        if "caption" in stages:
            config.captions = str(run_caption_stage(config))
        if "build" in stages:
            run_build_stage(config)
    except (PrepareError, tfds_builder.DatasetSourceError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
