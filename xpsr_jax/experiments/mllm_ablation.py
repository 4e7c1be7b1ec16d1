"""`python -m xpsr_jax.experiments.mllm_ablation`: the paper's MLLM study (supplement Table 3) as
one command. For each setting: captions of the LR made by the MLLM the setting names (what it sees
and how it is asked), SR with those captions, evaluation; then one table in the layout of Table 3
with the paper's numbers beside ours, as Markdown and JSON.

    python -m xpsr_jax.experiments.mllm_ablation --lr DRealSR/LR --gt DRealSR/HR --dataset DRealSR \\
        --weights XPSR --sd15 SD15 --captioner /models/llava-1.5-7b-hf \\
        --lowlevel-captioner /models/qinstruct-llava-hf --out ablation \\
        --settings original,llava13b=/models/llava-1.5-13b-hf,simple,downscale64,upscale256,blur,jpeg

Settings (only the captions change; the SR network always sees the original LR):
    original            the captioner(s) on the LR as it is
    llava13b=DIR        another (larger) high-level captioner
    simple              at most 20 words naming objects / distortions
    downscale64         the MLLM sees the LR downscaled to 64 px (shorter side)
    upscale256          ... upscaled to 256 px
    blur[=SIGMA]        ... Gaussian-blurred (sigma 2 px by default)
    jpeg[=QUALITY]      ... JPEG-compressed (quality 30 by default)

Every input is checked before any work (--lr images, --gt pairing and sizes, the weights, the
captioners, --config and every --set, --out writable): one line, exit status 2, nothing written.

Each stage is resumable and records what it was made from: `OUT/SETTING/sr_inputs.json` (the LR
images, weights, SD 1.5, tokenizer, recipe, captioners, transform and questions, paths and
fingerprints) beside `OUT/SETTING/sr/` (the outputs and infer.py's `captions.jsonl`: finished images
and made captions are kept), and `OUT/SETTING/metrics.json` (the scores, with the SR outputs', the
--gt folder's and the metrics' record). A rerun skips what is done from the same inputs; metrics
made from others are redone with a note; an SR stage made from others (or by an older version,
which recorded nothing) is refused before any work, naming what differs: give another --out, or
remove OUT/SETTING to redo it. How SR runs (batch sizes, compile cache, max_output_pixels) may change.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from ml_collections import config_dict

from xpsr_jax.captions.io import list_images
from xpsr_jax.captions.on_demand import check_captioner_folder
from xpsr_jax.captions.provenance import model_fingerprint
from xpsr_jax.cli_config import CommandParser, ConfigFlagError, parse_config_flags, report_error
from xpsr_jax.data.images import ImageReadError, image_size
from xpsr_jax.data.official_layout import LR_FOLDER, is_official_layout
from xpsr_jax.files import sampled_fingerprint, write_bytes_atomic
from xpsr_jax.evaluation.iqa import IQA_METRICS, expected_weight_paths, pyiqa_installed
from xpsr_jax.evaluation.pairing import PairingError
from xpsr_jax.evaluation.pairing import list_images as list_gt_images
from xpsr_jax.evaluation.paper import MLLM_ABLATION_METRICS, PAPER_MLLM_ABLATION
from xpsr_jax.evaluation.runner import ALL_METRICS, evaluate_folders, needs_reference, parse_metric_names
from xpsr_jax.inference import cli as infer_cli
from xpsr_jax.inference.config import validate_infer_config
from xpsr_jax.inference.preprocess import InputImageError
from xpsr_jax.models.single_file import SINGLE_FILE_SUFFIXES, is_single_file
from xpsr_jax.weights.fingerprints import tree_fingerprint, weights_fingerprint
from xpsr_jax.weights.formats import RELEASE, SD15_INFERENCE_PARTS, STABLEHLO, WeightsFormatError, detect_weights_format

SETTING_NAMES = ("original", "llava13b", "simple", "downscale64", "upscale256", "blur", "jpeg")
DEFAULT_SETTINGS = "original,simple,downscale64,upscale256,blur,jpeg"
LABELS = {"original": "original (captions of the LR)", "llava13b": "+ LLaVA-13b captions",
          "simple": "+ simple description (<= 20 words)", "downscale64": "+ captions of the LR downscaled to 64 px",
          "upscale256": "+ captions of the LR upscaled to 256 px", "blur": "+ captions of a Gaussian-blurred LR",
          "jpeg": "+ captions of a JPEG-compressed LR"}
HEADERS = {"ssim": "SSIM", "lpips": "LPIPS", "fid": "FID", "maniqa_koniq": "MANIQA", "musiq": "MUSIQ"}


def parse_settings(spec: str, captioner: str) -> dict[str, dict]:
    """'original,llava13b=DIR,blur=3' -> {name: {captioner, caption_transform, question_preset}}."""
    settings = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in SETTING_NAMES:
            raise ValueError(f"--settings {item!r}: unknown setting; valid: {', '.join(SETTING_NAMES)} "
                             "(llava13b=DIR, blur=SIGMA, jpeg=QUALITY take a value)")
        setting = {"captioner": captioner, "caption_transform": "", "question_preset": "official"}
        if name == "llava13b":
            if not value:
                raise ValueError("--settings llava13b needs the model folder: llava13b=DIR")
            setting["captioner"] = value
        elif value and name not in ("blur", "jpeg"):
            raise ValueError(f"--settings {item!r}: {name} takes no value")
        elif name == "simple":
            setting["question_preset"] = "simple"
        elif name == "downscale64":
            setting["caption_transform"] = "downscale:64"
        elif name == "upscale256":
            setting["caption_transform"] = "upscale:256"
        elif name == "blur":
            setting["caption_transform"] = f"gaussian_blur:{value or 2}"
        elif name == "jpeg":
            setting["caption_transform"] = f"jpeg:{value or 30}"
        if name in settings:
            raise ValueError(f"--settings names {name!r} twice")
        settings[name] = setting
    if not settings:
        raise ValueError("--settings names no setting")
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m xpsr_jax.experiments.mllm_ablation",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--lr", required=True, help="folder of LR images (a plain folder: no prompts needed)")
    parser.add_argument("--gt", help="folder of HR references, paired by file stem (full-reference metrics)")
    parser.add_argument("--dataset", choices=tuple(PAPER_MLLM_ABLATION), help="print the paper's numbers beside ours")
    parser.add_argument("--weights", required=True, help="XPSR weights, as for infer.py")
    parser.add_argument("--sd15", help="the SD 1.5 base, as for infer.py (a folder or the single file)")
    parser.add_argument("--tokenizer", help="with a single-file --sd15, as for infer.py")
    parser.add_argument("--captioner", required=True, help="the high-level (and, alone, low-level) MLLM folder")
    parser.add_argument("--lowlevel-captioner", help="the low-level MLLM folder (Q-Instruct); default: --captioner")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated (default: %(default)s)")
    parser.add_argument("--metrics", default=",".join(MLLM_ABLATION_METRICS),
                        help="metrics to compute (default: %(default)s); those that cannot run are named")
    parser.add_argument("--config", default=infer_cli.DEFAULT_CONFIG, metavar="FILE.py[:VARIANT]",
                        help="inference config for every setting (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an inference config override for every setting (as --config.KEY=VALUE of infer.py)")
    parser.add_argument("--out", required=True, help="output folder: one subfolder per setting, table.md, table.json")
    return parser


class StudyInputError(ValueError):
    """A bad input of the study, found before any work (the message names it and what is valid)."""


# Set per setting (--captioner, --settings): a --set of one would silently change a setting.
SETTING_KEYS = ("captioner.model", "captioner.lowlevel_model", "captioner.caption_transform",
                "captioner.question_preset")
# How SR runs, not what it makes (every image's draws come from config.seed whatever the batching):
# a rerun may change them, e.g. a smaller batch after running out of memory.
RUNTIME_KEYS = ("batch_size", "tiling.tile_batch_size", "captioner.batch_size", "compile_cache",
                "max_output_pixels")
SR_RECORD, METRICS_RECORD = "sr_inputs.json", "metrics.json"
RECORD_VERSION = 1
# Held for the reader; compared through what they resolve to (config_values), so the same recipe
# written another way (--set order, configs/infer.py vs infer.py) is the same stage.
NOT_COMPARED = ("version", "config", "set")


@dataclasses.dataclass
class Study:
    """The checked inputs of a run: everything a stage is made from."""

    args: argparse.Namespace
    settings: dict[str, dict]
    metrics: list[str]
    lr_files: list[Path]
    gt: Path | None
    config: config_dict.ConfigDict
    unavailable: dict[str, str]  # metrics that cannot run here, with the reason
    fingerprints: dict = dataclasses.field(default_factory=dict)  # cache: (kind, path) -> fingerprint


# ----------------------------------------------------------------------------- checks before any work


def parse_metrics(spec: str) -> list[str]:
    try:
        metrics = parse_metric_names(spec)
    except ValueError as error:
        raise StudyInputError(f"--metrics {spec!r}: {error}") from None
    if not metrics:
        raise StudyInputError(f"--metrics {spec!r} names no metric; valid: {', '.join(ALL_METRICS)}")
    return metrics


def check_lr(lr: str, config) -> list[Path]:
    """The LR images; every file infer.py would be given must be an image it can read, or infer.py
    would fail it after the captions and the SR of all the others."""
    folder = Path(lr)
    if is_official_layout(folder):
        raise StudyInputError(f"--lr {lr}: an official test-set folder (LR/, prompt folders): infer.py would read "
                              f"its prompts instead of the MLLM's captions; give its {LR_FOLDER}/ folder")
    files = list_images(lr)  # CaptionInputError: missing, not a folder, no images, two with one stem
    others = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p not in files
                    and (p.is_file() or (p.is_symlink() and not p.exists())))
    if others:
        raise StudyInputError(f"--lr {lr}: holds files that are not images ({_listed(others)}); infer.py would fail "
                              "them: move them out of the folder")
    for path in files:
        try:
            infer_cli.load_lr(path, apply_exif_orientation=config.apply_exif_orientation)
        except InputImageError as error:
            raise StudyInputError(f"--lr {path}: {error}") from None
    return files


def check_gt(gt: str | None, metrics: list[str], lr_files: list[Path], config) -> Path | None:
    """--gt: required exactly when a full-reference metric is asked; one image per LR stem, none
    without an LR image (the evaluation pairs the folders one to one), each the size of its SR."""
    full_reference = [m for m in metrics if needs_reference(m)]
    if gt is None:
        if full_reference:
            raise StudyInputError(f"--metrics {','.join(full_reference)}: full-reference, they need --gt (the HR "
                                  "folder, images named as the LR); or ask only no-reference metrics, e.g. "
                                  "--metrics maniqa_koniq,musiq")
        return None
    folder = Path(gt)
    if not folder.is_dir():
        raise StudyInputError(f"--gt {gt}: " + ("is a file, not a folder of HR images" if folder.exists()
                                                else "no such folder"))
    try:
        gts = list_gt_images(folder)
    except PairingError as error:
        raise StudyInputError(f"--gt {gt}: {error}") from None
    stems = {path.stem: path for path in lr_files}
    without_gt = [path.name for stem, path in stems.items() if stem not in gts]
    without_lr = [path.name for stem, path in gts.items() if stem not in stems]
    if without_gt:
        raise StudyInputError(f"--gt {gt}: no image for the LR image(s) {_listed(without_gt)} (pairing is by file "
                              "stem)")
    if without_lr:
        raise StudyInputError(f"--gt {gt}: image(s) {_listed(without_lr)} have no LR image in --lr (the evaluation "
                              "pairs the folders one to one): move them out or give a --gt folder of the LR's")
    for stem, lr_path in stems.items():
        check_gt_size(gts[stem], lr_path, config)
    return folder.resolve()


def check_gt_size(gt_path: Path, lr_path: Path, config) -> None:
    try:
        lr_height, lr_width = image_size(lr_path, apply_exif_orientation=config.apply_exif_orientation)
        height, width = image_size(gt_path)  # the evaluation reads it as a viewer shows it
    except ImageReadError as error:
        raise StudyInputError(str(error)) from None
    if (height, width) != (config.upscale * lr_height, config.upscale * lr_width):
        raise StudyInputError(f"--gt {gt_path}: {width}x{height} px, but the x{config.upscale} SR of {lr_path} is "
                              f"{config.upscale * lr_width}x{config.upscale * lr_height} px; pairs of other sizes "
                              "are not scored")


def check_weights(args) -> None:
    """--weights, --sd15, --tokenizer as infer.py will load them (named here, not after the captions)."""
    try:
        kind = detect_weights_format(args.weights)
    except WeightsFormatError as error:
        raise StudyInputError(f"--weights {error}") from None
    if kind == STABLEHLO:
        return  # holds every network
    if args.sd15 is None:
        missing = [part for part in SD15_INFERENCE_PARTS if not (Path(args.weights) / part).is_dir()]
        if missing:
            raise StudyInputError(f"--weights {args.weights} lacks the SD 1.5 subfolder(s) {missing}: give --sd15 "
                                  "(the SD 1.5 folder or its single file)")
    elif is_single_file(args.sd15):
        if args.tokenizer is None:
            raise StudyInputError(f"--sd15 {args.sd15} is a single-file checkpoint, which holds no tokenizer: give "
                                  "--tokenizer DIR (vocab.json and merges.txt, or an SD folder with tokenizer/)")
        if not any(all((folder / name).is_file() for name in ("vocab.json", "merges.txt"))
                   for folder in (Path(args.tokenizer), Path(args.tokenizer) / "tokenizer")):
            raise StudyInputError(f"--tokenizer {args.tokenizer}: no CLIP tokenizer there (needs vocab.json and "
                                  "merges.txt, in the folder or its tokenizer/)")
    elif Path(args.sd15).is_dir():
        missing = [part for part in SD15_INFERENCE_PARTS if not (Path(args.sd15) / part).is_dir()]
        if missing:
            raise StudyInputError(f"--sd15 {args.sd15}: missing SD 1.5 subfolder(s) {missing}")
    else:
        raise StudyInputError(f"--sd15 {args.sd15}: no such folder, nor a single-file checkpoint "
                              f"({', '.join(SINGLE_FILE_SUFFIXES)})")


def study_config(args) -> config_dict.ConfigDict:
    """--config and every --set, parsed and validated the way infer.py will (one line naming a bad
    one); the keys the settings set may not be --set."""
    overrides = []
    for item in args.set:
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            raise StudyInputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set num_inference_steps=25")
        if key.strip() in SETTING_KEYS:
            raise StudyInputError(f"--set {item!r}: {key.strip()} is what the settings change; give it with "
                                  "--captioner, --lowlevel-captioner or --settings")
        overrides.append(f"--config.{item}")
    try:
        config, _ = parse_config_flags(["--config", args.config, *overrides], default=infer_cli.DEFAULT_CONFIG)
    except ConfigFlagError as error:  # names the file, key or value (or what its get_config() raised)
        raise StudyInputError(str(error)) from None
    try:
        validate_infer_config(config)
    except ValueError as error:
        given = f"--config {args.config}" + "".join(f" --set {item}" for item in args.set)
        raise StudyInputError(f"{error} (from {given})") from None
    return config


def check_metrics_can_run(metrics: list[str]) -> dict[str, str]:
    """{metric: why it cannot run here}: pyiqa or its weights missing. All of them: refused now,
    not after the SR of every setting."""
    unavailable = {}
    for name in metrics:
        if name not in IQA_METRICS:
            continue
        if not pyiqa_installed():
            unavailable[name] = "pyiqa is not installed (optional: pip install pyiqa, then place its weights)"
            continue
        missing = [str(path) for path in expected_weight_paths(IQA_METRICS[name]) if not path.exists()]
        if missing:
            unavailable[name] = f"weights not found locally (nothing is downloaded): {', '.join(missing)}"
    if len(unavailable) == len(metrics):
        raise StudyInputError("none of the --metrics can run here: " + "; ".join(f"{m}: {why}" for m, why
                                                                                 in unavailable.items()))
    return unavailable


def check_out(out: Path, settings) -> None:
    """--out (and the setting folders already in it) takes files: probed with a temporary file that
    is removed, so nothing is left when a check fails."""
    if out.exists() and not out.is_dir():
        raise StudyInputError(f"--out {out}: exists and is not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise StudyInputError(f"--out {out}: cannot be a folder: {existing} is a file")
    folders = [existing] + [p for name in settings for p in (out / name, out / name / "sr") if p.is_dir()]
    for folder in folders:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise StudyInputError(f"--out {out}: cannot write in {folder} ({error.strerror or error})") from None


def check_study(args) -> Study:
    """Every input, before any work: one StudyInputError naming the first bad one."""
    settings = parse_settings(args.settings, args.captioner)
    metrics = parse_metrics(args.metrics)
    config = study_config(args)
    lr_files = check_lr(args.lr, config)
    gt = check_gt(args.gt, metrics, lr_files, config)
    unavailable = check_metrics_can_run(metrics)
    check_weights(args)
    for folder in dict.fromkeys([lowlevel_captioner(args), *(s["captioner"] for s in settings.values())]):
        check_captioner_folder(folder)
    return Study(args, settings, metrics, lr_files, gt, config, unavailable)


def _listed(names: list[str], shown: int = 10) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ----------------------------------------------------------------------------- what each stage is made from


def images_fingerprint(paths) -> str:
    """sha256 over the names and the sha256 of the bytes of every image: any changed pixel changes it."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def weights_fingerprint_of(path: str) -> str:
    """A release: its unet/, controlnet/ and any SD 1.5 parts beside them; an export: every file."""
    if detect_weights_format(path) == RELEASE:
        return weights_fingerprint(path, ("unet", "controlnet", *SD15_INFERENCE_PARTS))
    return tree_fingerprint(path)


def sd15_fingerprint(path: str) -> str:
    """The single file sampled, or the folder's inference parts."""
    return sampled_fingerprint(path) if is_single_file(path) else weights_fingerprint(path, SD15_INFERENCE_PARTS)


def _fingerprint(study: Study, kind: str, path: str) -> str:
    """Each input read once per run, however many settings use it."""
    key = (kind, str(Path(path).resolve()))
    if key not in study.fingerprints:
        study.fingerprints[key] = {
            "weights": weights_fingerprint_of,
            "sd15": sd15_fingerprint,
            "tokenizer": tree_fingerprint,
            "captioner": model_fingerprint,
            "images": lambda p: images_fingerprint(list_images(p)),
        }[kind](path)
    return study.fingerprints[key]


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def flat_config(config: config_dict.ConfigDict) -> dict:
    """{"tiling.latent_tile_size": 320, ...} without RUNTIME_KEYS nor the SETTING_KEYS, as JSON holds it."""
    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, (dict, config_dict.ConfigDict)):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    values = {key: value for key, value in walk(config.to_dict())
              if key not in RUNTIME_KEYS and key not in SETTING_KEYS}
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def lowlevel_captioner(args) -> str:
    """The model that answers the low-level questions of every setting (llava13b replaces only the
    high-level one)."""
    return args.lowlevel_captioner or args.captioner


def sr_record(study: Study, setting: dict) -> dict:
    """What OUT/SETTING/sr is made from: the LR images, the networks, the recipe, the captioners and
    how they are asked."""
    args = study.args
    record = {"version": RECORD_VERSION, "lr": _resolved(args.lr), "lr_images": _fingerprint(study, "images", args.lr),
              "weights": _resolved(args.weights), "weights_fingerprint": _fingerprint(study, "weights", args.weights),
              "sd15": _resolved(args.sd15), "sd15_fingerprint": args.sd15 and _fingerprint(study, "sd15", args.sd15),
              "tokenizer": _resolved(args.tokenizer),
              "tokenizer_fingerprint": args.tokenizer and _fingerprint(study, "tokenizer", args.tokenizer),
              "config": args.config, "set": list(args.set), "config_values": flat_config(study.config)}
    for role, folder in (("captioner", setting["captioner"]), ("lowlevel_captioner", lowlevel_captioner(args))):
        record[role] = _resolved(folder)
        record[f"{role}_fingerprint"] = _fingerprint(study, "captioner", folder)
    record.update(caption_transform=setting["caption_transform"], question_preset=setting["question_preset"])
    return record


def metrics_record(study: Study, sr_dir: Path) -> dict:
    """What OUT/SETTING/metrics.json is made from: the SR outputs, the references, the metrics."""
    return {"sr_outputs": images_fingerprint([sr_dir / f"{p.stem}.png" for p in study.lr_files]),
            "gt": None if study.gt is None else str(study.gt),
            "gt_images": None if study.gt is None else _fingerprint(study, "images", str(study.gt)),
            "metrics": list(study.metrics)}


def changes(old: dict, new: dict) -> list[str]:
    """'what: old -> new' for every input that differs (fingerprints shortened)."""
    def shown(value):
        return f"{value[:12]}" if isinstance(value, str) and len(value) == 64 else json.dumps(value)

    found = []
    for key in sorted(set(old) | set(new)):
        if key in NOT_COMPARED or old.get(key) == new.get(key):
            continue
        if key == "config_values" and isinstance(old.get(key), dict):
            before, after = old[key], new[key]
            found += [f"config {k}: {shown(before.get(k))} -> {shown(after.get(k))}"
                      for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        else:
            found.append(f"{key}: {shown(old.get(key))} -> {shown(new.get(key))}")
    return found


def read_record(path: Path) -> dict | None:
    """A stage record, or None when it is missing or unreadable (a file we write atomically is only
    unreadable when something else wrote it)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_sr_stages(study: Study) -> dict[str, dict]:
    """{setting: its SR record}, after refusing any OUT/SETTING whose SR was made from other inputs,
    or by an older version that did not record them (its outputs cannot be told apart from
    another recipe's: refused, not silently reused nor overwritten)."""
    records = {}
    for name, setting in study.settings.items():
        folder = Path(study.args.out) / name
        record = records[name] = sr_record(study, setting)
        old = read_record(folder / SR_RECORD)
        sr_dir = folder / "sr"
        if old is None and (folder / SR_RECORD).exists():
            raise StudyInputError(f"{folder}: {SR_RECORD} is unreadable; remove {folder} to redo this setting, or "
                                  "give another --out")
        if old is None and sr_dir.is_dir() and any(sr_dir.iterdir()):
            raise StudyInputError(f"{folder}: its SR outputs were made by an older version, which did not record "
                                  f"what they were made from; remove {folder} to redo this setting, or give another "
                                  "--out")
        if old is not None and changes(old, record):
            raise StudyInputError(f"{folder}: made from other inputs ({'; '.join(changes(old, record))}); give "
                                  f"another --out, or remove {folder} to redo this setting")
    return records


def write_json_atomic(path: Path, value) -> None:
    write_bytes_atomic(path, json.dumps(value, indent=1).encode(), fsync=True)


# ----------------------------------------------------------------------------- the stages


def sr_done(lr_files: list[Path], sr_dir: Path) -> bool:
    return all(infer_cli.is_finished_output(sr_dir / f"{path.stem}.png") for path in lr_files)


def run_sr(name: str, setting: dict, study: Study, record: dict, sr_dir: Path) -> None:
    args = study.args
    # Written before the first output: a rerun with other inputs is refused, even mid-setting.
    write_json_atomic(sr_dir.parent / SR_RECORD, record)
    print(f"[{name}] captions ({setting['caption_transform'] or 'the LR as it is'}, "
          f"{setting['question_preset']} questions) and SR", flush=True)
    argv = ["--weights", args.weights, "--input", args.lr, "--output", str(sr_dir), "--config", args.config,
            "--captioner", setting["captioner"], "--caption-transform", setting["caption_transform"],
            f"--config.captioner.question_preset={setting['question_preset']}",
            *(f"--config.{item}" for item in args.set)]
    argv += ["--sd15", args.sd15] if args.sd15 else []
    argv += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    # llava13b replaces the high-level captioner only; the low-level one stays the study's.
    lowlevel = args.lowlevel_captioner or (args.captioner if setting["captioner"] != args.captioner else None)
    argv += ["--lowlevel-captioner", lowlevel] if lowlevel else []
    code = infer_cli.main(argv)
    if code != 0 or not sr_done(study.lr_files, sr_dir):
        raise RuntimeError(f"[{name}] infer.py exited with status {code}; its errors are above. Rerun the same "
                           "command to resume")


def run_metrics(name: str, setting: dict, study: Study, sr_dir: Path) -> tuple[dict, bool]:
    """(the metrics record, whether it was reused). metrics.json is reused only when made from the
    same SR outputs, references and metrics; it is cheap and derived, so anything else is redone,
    with a note naming what changed."""
    metrics_path = sr_dir.parent / METRICS_RECORD
    inputs = metrics_record(study, sr_dir)
    old = read_record(metrics_path) if metrics_path.exists() else None
    if old is not None and old.get("inputs") == inputs:
        return old, True
    if metrics_path.exists():
        what = ("; ".join(changes(old["inputs"], inputs)) if old is not None and isinstance(old.get("inputs"), dict)
                else "made by an older version, which did not record its inputs" if old is not None
                else f"{metrics_path} is unreadable")
        print(f"[{name}] metrics redone: {what}", flush=True)
    result = evaluate_folders(sr_dir, study.gt, study.metrics, progress=False)
    record = {"setting": name, "means": result.means, "unavailable": result.unavailable,
              "images": len(result.per_image), "captioner": setting["captioner"],
              "caption_transform": setting["caption_transform"], "question_preset": setting["question_preset"],
              "inputs": inputs}
    write_json_atomic(metrics_path, record)
    return record, False


def run_setting(name: str, setting: dict, study: Study, record: dict) -> dict:
    sr_dir = Path(study.args.out) / name / "sr"
    done_before = sr_done(study.lr_files, sr_dir)
    if not done_before:
        run_sr(name, setting, study, record, sr_dir)
    row, reused = run_metrics(name, setting, study, sr_dir)
    if done_before:
        print(f"[{name}] done before: skipped" if reused else f"[{name}] SR outputs done before; evaluated",
              flush=True)
    return row


def table(records: list[dict], metrics: list[str], dataset: str | None) -> str:
    def cells(values):
        return " | ".join("n/a" if value is None else f"{value:.4f}" if value < 10 else f"{value:.2f}"
                          for value in values)

    names = [HEADERS.get(m, m) for m in metrics]
    header = "| setting | " + " | ".join(names) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    if dataset:
        header += f" paper ({dataset}): " + " / ".join(HEADERS[m] for m in MLLM_ABLATION_METRICS) + " |"
        rule += "---|"
    lines = [header, rule]
    for record in records:
        line = f"| {LABELS[record['setting']]} | {cells(record['means'].get(m) for m in metrics)} |"
        if dataset:
            paper = PAPER_MLLM_ABLATION[dataset].get(record["setting"])
            line += " " + (" / ".join(f"{v:g}" for v in paper) if paper else "") + " |"
        lines.append(line)
    unavailable = {}
    for record in records:
        unavailable.update(record["unavailable"])
    if unavailable:
        lines += ["", "Not computed: " + "; ".join(f"{m}: {why}" for m, why in unavailable.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        study = check_study(args)
        records = check_sr_stages(study)
        check_out(Path(args.out), study.settings)
        for metric, why in study.unavailable.items():
            print(f"note: {metric} cannot run here ({why}); the table says n/a", flush=True)
        rows = [run_setting(name, setting, study, records[name]) for name, setting in study.settings.items()]
        write_tables(Path(args.out), rows, study.metrics, args.dataset)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        report_error(error)
        return 2
    return 0


def write_tables(out: Path, rows: list[dict], metrics: list[str], dataset: str | None) -> None:
    text = table(rows, metrics, dataset)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"dataset": dataset, "metrics": metrics, "rows": rows,
                                                "paper": PAPER_MLLM_ABLATION.get(dataset)}, indent=1))
    print(text + f"\nwrote {out / 'table.md'} and {out / 'table.json'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
