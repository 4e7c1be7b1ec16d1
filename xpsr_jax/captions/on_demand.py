"""Captions made when they are needed: infer.py's `--captioner` for images that have no prompt
from any other source.

    check_captioner_folder(path) -> None     an image-text-to-text model folder, or CaptionInputError
    caption_missing(wanted, output=..., model=..., ...) -> OnDemandCaptions

Records go to `output` in the captions tool's format (image id = file stem, source "lr") as they
are made, so a rerun reuses them and a crash loses at most one batch. Each records the model's
fingerprint and the image file's sha256: a rerun reuses a record only for the same model and the
same image bytes (see caption_missing). One model answers both
questions unless a second one is given for the low-level ones; each model is released (its memory
freed) once its questions are answered, before anything else runs.
"""

from __future__ import annotations

import gc
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from xpsr_jax.captions import batches, generate, io, provenance, transforms, work
from xpsr_jax.captions.config import preset_question

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class OnDemandCaptions:
    made: int = 0
    reused: int = 0
    stale: int = 0  # records dropped: of another image under the same name, or without an image hash
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
    `output`. A record is reused only when it was made by the same model folder holding the same
    files and of the same image bytes; a file made by another model (or with another question or
    transform) is refused, records of other images are dropped and made again. Everything is
    checked before any model loads. `progress(total, desc)` -> a tqdm-like bar, optional."""
    spec = transforms.describe(transforms.parse_transforms(caption_transform))
    models = {"highlevel": model, "lowlevel": lowlevel_model or model}
    tasks = [task for task in ("highlevel", "lowlevel") if wanted.get(task)]
    if not tasks:
        return OnDemandCaptions()
    _check_output_file(output)
    fingerprints = {}
    for folder in dict.fromkeys(models[task] for task in tasks):
        check_captioner_folder(folder)
        fingerprints[folder] = provenance.model_fingerprint(folder)
    existing = _read_output(output)
    for task in tasks:
        batches.check_same_question(existing, task, preset_question(question_preset, task), output, spec)
        provenance.check_same_model(existing, task, models[task], fingerprints[models[task]], output)
    current = _image_digests(wanted, tasks)
    kept, stale = provenance.split_stale(existing, current)
    if stale:  # rewritten first, so the file never holds two captions for one key
        io.replace_records(output, kept)
        log(f"captions: {len(stale)} record(s) in {output} no longer match their image (another file under the "
            "same name, or made before image hashes were recorded): dropped, made again")
    done = {io.record_key(record) for record in kept}
    todo = {task: [work.WorkItem(p.stem, "lr", p) for p in wanted[task] if (p.stem, "lr", task) not in done]
            for task in tasks}
    result = OnDemandCaptions(reused=sum(len(wanted[task]) - len(todo[task]) for task in tasks), stale=len(stale))
    if any(todo.values()):
        with io.CaptionWriter(output) as writer:  # opened before a model loads: an unwritable file fails first
            for folder in dict.fromkeys(models[task] for task in tasks if todo[task]):
                settings = [batches.CaptionSettings(
                    task=task, question=preset_question(question_preset, task), model_name=folder,
                    model_fingerprint=fingerprints[folder], question_preset=question_preset,
                    caption_transform=spec, batch_size=batch_size, max_new_tokens=max_new_tokens)
                    for task in tasks if todo[task] and models[task] == folder]
                result.made += _caption_with(folder, settings, todo, writer, device, dtype, log, progress)
    records, _ = io.read_records(output)
    result.captions = {io.record_key(r): r["text"] for r in records
                       if current.get(io.record_key(r)) == r.get("image_sha256")}
    return result


def _check_output_file(output: pathlib.Path) -> None:
    try:
        io.check_caption_file(output)
    except io.CaptionInputError as error:
        raise io.CaptionInputError(f"{error}; captions made on the fly are kept in that file: move it away or "
                                   "give another --output") from None


def _read_output(output: pathlib.Path) -> list[dict]:
    """The records made before (a partial last line cut off); a damaged file is named with the remedy."""
    if not output.exists():
        return []
    try:
        return io.repair_partial_tail(output)
    except io.CaptionInputError as error:
        raise io.CaptionInputError(f"{error}; captions made on the fly are kept in that file: remove it to make "
                                   "them again, or give another --output") from None


def _image_digests(wanted: Mapping[str, Sequence[pathlib.Path]], tasks: Sequence[str]) -> dict[io.CaptionKey, str]:
    """(image id, "lr", task) -> the sha256 of the image file now under that name (each file read once)."""
    digests: dict[pathlib.Path, str] = {}
    for task in tasks:
        for path in wanted[task]:
            if path not in digests:
                digests[path] = provenance.file_sha256(path)
    return {(path.stem, "lr", task): digests[path] for task in tasks for path in wanted[task]}


def _caption_with(folder: str, settings: Sequence[batches.CaptionSettings], todo, writer: io.CaptionWriter,
                  device, dtype: str, log, progress) -> int:
    """Loads the model of `folder` once, answers each settings' question for its task's images,
    then frees the model; returns how many records were written."""
    captioner, made = None, 0
    try:
        for task_settings in settings:
            task = task_settings.task
            if captioner is None:
                log(f"loading the captioning model {folder}")
                captioner = batches.load_captioner(folder, task_settings.question, task_settings, device, dtype)
            else:
                captioner = batches.with_question(captioner, task_settings.question, folder, task_settings)
            bar = progress(len(todo[task]), f"{task} captions") if progress else None
            try:
                made += batches.caption_items(captioner, todo[task], task_settings, writer, bar)
            finally:
                if bar is not None:
                    bar.close()
    finally:
        if captioner is not None:
            _release(captioner)
    return made
