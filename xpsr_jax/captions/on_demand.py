"""Captions made when they are needed: infer.py's `--captioner` for images that have no prompt
from any other source.

    check_captioner_folder(path) -> None     an image-text-to-text model folder, or CaptionInputError
    caption_missing(wanted, output=..., model=..., ...) -> OnDemandCaptions

Records go to `output` in the captions tool's format (image id = file stem, source "lr") as they
are made, so a rerun reuses them and a crash loses at most one batch. One model answers both
questions unless a second one is given for the low-level ones; each model is released (its memory
freed) once its questions are answered, before anything else runs.
"""

from __future__ import annotations

import gc
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from xpsr_jax.captions import batches, generate, io, transforms, work
from xpsr_jax.captions.config import preset_question

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class OnDemandCaptions:
    made: int = 0
    reused: int = 0
    captions: dict[io.CaptionKey, str] = field(default_factory=dict)


def check_captioner_folder(path: str) -> None:
    """CaptionInputError naming `path` unless it holds an image-text-to-text model with its
    processor and tokenizer files (checked before any image is captioned)."""
    folder = generate.check_model_dir(path)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError) as error:
        raise io.CaptionInputError(f"captioning model {path!r}: unreadable config.json ({error})") from None
    from transformers.models.auto.modeling_auto import (  # lazy: seconds to import
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise io.CaptionInputError(f"captioning model {path!r} is a {model_type or 'model without model_type'!r}, "
                                   "not an image-text-to-text model (e.g. LLaVA-1.5 in its -hf format)")
    missing = [kind for kind, names in (("processor", _PROCESSOR_FILES), ("tokenizer", _TOKENIZER_FILES))
               if not any((folder / name).is_file() for name in names)]
    if missing:
        raise io.CaptionInputError(f"captioning model {path!r} lacks its {' and '.join(missing)} files "
                                   f"(one of {list(_PROCESSOR_FILES) if 'processor' in missing else []}"
                                   f"{list(_TOKENIZER_FILES) if 'tokenizer' in missing else []})")


def _release(captioner: generate.Captioner) -> None:
    device = captioner.device
    captioner.model = captioner.processor = None
    gc.collect()
    if str(device).startswith("cuda"):
        generate.import_torch().cuda.empty_cache()


def caption_missing(wanted: Mapping[str, Sequence[pathlib.Path]], *, output: pathlib.Path, model: str,
                    lowlevel_model: str = "", caption_transform: str = "", question_preset: str = "official",
                    batch_size: int = 8, max_new_tokens: int = 200, dtype: str = "auto", device: str | None = None,
                    log: Callable[[str], None] = print, progress: Callable | None = None) -> OnDemandCaptions:
    """Captions of kind `task` for every image of `wanted[task]` ("highlevel" / "lowlevel"),
    made with `model` (`lowlevel_model` for the low-level ones when given) or reused from
    `output`. `progress(total, desc)` -> a tqdm-like bar, optional."""
    spec = transforms.describe(transforms.parse_transforms(caption_transform))
    models = {"highlevel": model, "lowlevel": lowlevel_model or model}
    for folder in sorted({models[task] for task in wanted if wanted[task]}):
        check_captioner_folder(folder)
    existing = io.repair_partial_tail(output) if output.exists() else []
    result = OnDemandCaptions()
    todo: dict[str, list[work.WorkItem]] = {}
    done = {io.record_key(r) for r in existing}
    for task, paths in wanted.items():
        question = preset_question(question_preset, task)
        batches.check_same_question(existing, task, question, output, spec)
        todo[task] = [work.WorkItem(p.stem, "lr", p) for p in paths if (p.stem, "lr", task) not in done]
        result.reused += len(paths) - len(todo[task])
    for folder in dict.fromkeys(models[task] for task in ("highlevel", "lowlevel") if todo.get(task)):
        tasks = [task for task in ("highlevel", "lowlevel") if todo.get(task) and models[task] == folder]
        captioner = None
        for task in tasks:
            settings = batches.CaptionSettings(task=task, question=preset_question(question_preset, task),
                                               model_name=folder, question_preset=question_preset,
                                               caption_transform=spec, batch_size=batch_size,
                                               max_new_tokens=max_new_tokens)
            if captioner is None:
                log(f"loading the captioning model {folder}")
                captioner = batches.load_captioner(folder, settings.question, settings, device, dtype)
            else:
                captioner = batches.with_question(captioner, settings.question, folder, settings)
            bar = progress(len(todo[task]), f"{task} captions") if progress else None
            try:
                with io.CaptionWriter(output) as writer:
                    result.made += batches.caption_items(captioner, todo[task], settings, writer, bar)
            finally:
                if bar is not None:
                    bar.close()
        if captioner is not None:
            _release(captioner)
    records, _ = io.read_records(output) if output.exists() else ([], 0)
    wanted_keys = {(p.stem, "lr", task) for task, paths in wanted.items() for p in paths}
    result.captions = {io.record_key(r): r["text"] for r in records if io.record_key(r) in wanted_keys}
    return result
