"""Stable Diffusion 1.x as one original-layout checkpoint (`v1-5-pruned-emaonly.safetensors`,
`.ckpt`), converted once into the diffusers folder layout every command reads.

Many people have SD 1.5 only as that single file (its diffusers page is gone). It holds the UNet
(`model.diffusion_model.*`, and in the full file its EMA copy `model_ema.*`), the VAE
(`first_stage_model.*`) and the CLIP text encoder (`cond_stage_model.transformer.*`), but no
configs, tokenizer or scheduler. Key names are converted by diffusers' own single-file code (the
library that defines both layouts); the configs are SD 1.5's built-in ones, or those of a
diffusers folder (`config_folder`) for other shapes; the tokenizer comes from `tokenizer` or that
folder, the scheduler from that folder or SD 1.5's. The converted folder is cached under the user
cache folder, keyed by content (the file's SHA-256, read once per version of the file, and the
tokenizer and configs it takes), so a file replaced by another is never served the old
conversion; it is written atomically: a rerun reuses it, an interrupted conversion leaves nothing
half-written. Each converted network is checked against its config before anything is written, so
a wrong-shape tensor is named against the file the user gave.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from xpsr_jax.files import current_umask, write_bytes_atomic
from xpsr_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from xpsr_jax.models.unet import UNet2DCondition, UNet2DConditionConfig
from xpsr_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from xpsr_jax.weights.convert import WeightLoadError
from xpsr_jax.weights.files import WeightFileError, read_state_dict, write_state_dict

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DIGESTS_DIR = "digests"  # in the cache root: each file version's SHA-256, so a 4 GB file is read once
CONVERSION_VERSION = 1  # part of the cache key: bump when the converted folder's contents change

# SD 1.5's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_EMA_PREFIX = "model_ema."


def is_single_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def add_single_file_arguments(parser) -> None:
    """The flags of a command whose `--sd15` may be a single file: what the file lacks."""
    parser.add_argument("--tokenizer", help="with a single-file --sd15: the CLIP tokenizer folder (vocab.json, "
                        "merges.txt), or an SD folder with tokenizer/")
    parser.add_argument("--sd15-config", help="with a single-file --sd15 whose networks are not SD 1.5's shapes: a "
                        "diffusers folder with their config.json files (unet/, vae/, text_encoder/)")


def single_file_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xpsr_jax" / "sd15_single_file"


def _tokenizer_folder(tokenizer: str | os.PathLike | None, config_folder: Path | None, source: Path) -> Path:
    candidates = []
    if tokenizer is not None:
        candidates += [Path(tokenizer), Path(tokenizer) / "tokenizer"]
    elif config_folder is not None:
        candidates.append(config_folder / "tokenizer")
    for folder in candidates:
        if all((folder / name).is_file() for name in _TOKENIZER_FILES):
            return folder
    if tokenizer is not None:
        raise WeightFileError(f"--tokenizer {tokenizer}: no CLIP tokenizer there (needs {list(_TOKENIZER_FILES)}, "
                              "in the folder or its tokenizer/)")
    raise WeightFileError(f"{source}: a single-file checkpoint holds no tokenizer; give --tokenizer DIR (a CLIP "
                          f"tokenizer folder with {' and '.join(_TOKENIZER_FILES)}, e.g. an SD 1.5 folder's "
                          "tokenizer/)")


def _configs(config_folder: Path | None) -> dict[str, dict]:
    """The diffusers / transformers config dicts of the three networks."""
    if config_folder is None:
        return {"unet": UNet2DConditionConfig().to_dict(), "vae": AutoencoderKLConfig().to_dict(),
                "text_encoder": CLIPTextConfig.stable_diffusion_v1().to_dict()}
    configs = {}
    for part in ("unet", "vae", "text_encoder"):
        path = config_folder / part / "config.json"
        if not path.is_file():
            raise WeightFileError(f"{config_folder}: no {part}/config.json (the configs of the single file's "
                                  "networks are read from there)")
        configs[part] = json.loads(path.read_text())
    return configs


def file_digest(path: Path, memo_folder: Path, log: Callable[[str], None] = print) -> str:
    """SHA-256 of the whole file, read once per version of it: the digest is remembered under
    (device, inode, size, mtime, ctime). A file replaced by another of the same size with its
    mtime restored still gets a new ctime (which no user call can set back), so it is hashed
    again rather than mistaken for the old one."""
    stat = path.stat()
    version = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    memo = memo_folder / hashlib.sha256(version.encode()).hexdigest()[:32]
    try:
        remembered = memo.read_text().strip()
        if len(remembered) == 64:
            return remembered
    except OSError:
        pass
    if stat.st_size > 1 << 28:
        log(f"reading {path} ({stat.st_size / 2**30:.1f} GiB) to fingerprint it (once per version of the file) ...")
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    try:  # a memo that cannot be written costs a re-read next time, nothing else
        memo_folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo, digest.encode())
    except OSError:
        pass
    return digest


def _folder_digest(folder: Path, names: list[str] | None = None) -> str:
    """SHA-256 over the relative names and bytes of `names` in `folder` (default: every file)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if names is None else \
        [folder / name for name in names if (folder / name).is_file()]
    for file in files:
        digest.update(f"{file.relative_to(folder)}\n".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _cache_key(path: Path, tokenizer: Path, config_folder: Path | None, root: Path,
               log: Callable[[str], None]) -> str:
    """The converted folder's name: what it is made from, by content (the file, the tokenizer,
    the configs and scheduler it takes), and the conversion's version."""
    configs = _folder_digest(config_folder, [f"{part}/config.json" for part in ("unet", "vae", "text_encoder")]
                             + ["scheduler/scheduler_config.json"]) if config_folder is not None else "sd15"
    parts = [file_digest(path, root / DIGESTS_DIR, log), _folder_digest(tokenizer), configs, str(CONVERSION_VERSION)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def check_converted_shapes(parts: dict[str, dict[str, np.ndarray]], configs: dict[str, dict], *, source: str) -> None:
    """WeightFileError naming the single file (`source`) when a converted network does not fit its
    config: caught at conversion, not later against the cached copy's file names."""
    for name, model_class in (("unet", UNet2DCondition), ("vae", AutoencoderKL), ("text_encoder", CLIPTextEncoder)):
        config = model_class.config_class.from_dict(configs[name], source=f"{source} ({name} config)")
        try:
            model_class.check_state_dict(config, parts[name], source=f"{source} ({name} weights)")
        except WeightLoadError as error:
            raise WeightFileError(str(error)) from None


def convert_single_file(checkpoint: dict[str, np.ndarray], configs: dict[str, dict], *,
                        source: str = "checkpoint") -> tuple[dict[str, dict[str, np.ndarray]], bool]:
    """({"unet", "vae", "text_encoder"} -> diffusers / transformers state dict, whether the UNet
    is the EMA copy). The EMA weights are taken when the file has them (as the `-emaonly` file
    holds under the plain names): they are the ones SD 1.5 samples with."""
    from diffusers.loaders import single_file_utils as ldm  # lazy: imports torch

    has_ema = sum(key.startswith(_EMA_PREFIX) for key in checkpoint) > 100
    parts = {
        "unet": ldm.convert_ldm_unet_checkpoint(checkpoint, configs["unet"], extract_ema=has_ema),
        "vae": ldm.convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),
        "text_encoder": ldm.convert_ldm_clip_checkpoint(checkpoint),
    }
    empty = [name for name, state in parts.items() if not state]
    if empty:
        prefixes = {"unet": ldm.LDM_UNET_KEY, "vae": " / ".join(ldm.LDM_VAE_KEYS),
                    "text_encoder": ldm.LDM_CLIP_PREFIX_TO_REMOVE[0]}
        raise WeightFileError(f"{source}: not a Stable Diffusion 1.x single-file checkpoint: no {empty} weights "
                              f"(keys starting {[prefixes[name] for name in empty]}); "
                              f"{len(checkpoint)} keys, e.g. {sorted(checkpoint)[:3]}")
    missing = {name: [key for key, value in state.items() if value is None] for name, state in parts.items()}
    missing = {name: keys for name, keys in missing.items() if keys}
    if missing:
        raise WeightFileError(f"{source}: incomplete checkpoint; no tensor for {missing}")
    as_numpy = {name: {key: np.asarray(value) for key, value in state.items()} for name, state in parts.items()}
    return as_numpy, has_ema


def sd15_folder(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                config_folder: str | os.PathLike | None = None, cache_root: str | os.PathLike | None = None,
                log: Callable[[str], None] = print) -> Path:
    """The SD 1.5 base as a diffusers folder: `path` itself when it is a folder, else the single
    file converted into one (cached; see the module docstring). `tokenizer`: a CLIP tokenizer
    folder (or an SD folder with tokenizer/); `config_folder`: a diffusers SD folder whose configs
    (and tokenizer, scheduler) describe the file's networks when they are not SD 1.5's."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or folder (the SD 1.5 base: a diffusers folder, or a single "
                              f"{' / '.join(SINGLE_FILE_SUFFIXES)} checkpoint)")
    if not is_single_file(path):
        raise WeightFileError(f"{path}: not an SD 1.5 base; give a diffusers folder (vae/, text_encoder/, "
                              f"tokenizer/, scheduler/, unet/) or a single {' / '.join(SINGLE_FILE_SUFFIXES)} file")
    config_folder = Path(config_folder) if config_folder is not None else None
    if config_folder is not None and not config_folder.is_dir():
        raise WeightFileError(f"{config_folder}: config folder not found")
    tokenizer_folder = _tokenizer_folder(tokenizer, config_folder, path)
    root = Path(cache_root) if cache_root is not None else single_file_cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else \
            (error.strerror or str(error))
        raise WeightFileError(f"{path}: cannot make the folder {root} for its converted copy ({reason}); set "
                              "XDG_CACHE_HOME to a writable folder") from None
    target = root / _cache_key(path, tokenizer_folder, config_folder, root, log)
    if (target / "model_index.json").is_file():
        return target
    configs = _configs(config_folder)
    log(f"converting {path} to the diffusers layout in {target} (once; later runs reuse it) ...")
    parts, ema = convert_single_file(read_state_dict(path), configs, source=str(path))
    check_converted_shapes(parts, configs, source=str(path))
    needed = sum(array.nbytes for state in parts.values() for array in state.values())
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        raise WeightFileError(f"{path}: converting needs {needed / 2**30:.2f} GiB in {root} and "
                              f"{free / 2**30:.2f} GiB is free; set XDG_CACHE_HOME to a larger disk")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the kept folder gets what mkdir would give
    try:
        for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                           ("text_encoder", "model")):
            (staging / name).mkdir()
            (staging / name / "config.json").write_text(json.dumps(configs[name], indent=2))
            write_state_dict(staging / name / f"{stem}.safetensors", parts[name])
        shutil.copytree(tokenizer_folder, staging / "tokenizer")
        scheduler = config_folder / "scheduler" if config_folder is not None else None
        (staging / "scheduler").mkdir()
        if scheduler is not None and (scheduler / "scheduler_config.json").is_file():
            shutil.copy(scheduler / "scheduler_config.json", staging / "scheduler" / "scheduler_config.json")
        else:
            (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
        (staging / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "converted_from": str(path.resolve()), "unet_ema": ema,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"]}, indent=2))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"converted {path} ({'EMA' if ema else 'non-EMA'} UNet weights) into {target}")
    return target

