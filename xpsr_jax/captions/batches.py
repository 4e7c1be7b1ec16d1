"""The captioning loop shared by `python -m xpsr_jax.captions` and infer.py's captions on the fly:
images loaded (and transformed for the model) one batch ahead, answered, each batch appended and
fsynced before the next starts, so a killed run loses at most the batch in flight.

    CaptionSettings(...)                                    how to ask
    check_same_question(records, task, question, path, caption_transform)   no mixed studies in a file
    caption_items(captioner, items, settings, writer, progress=None) -> int   records written (each with the
                                                     model's fingerprint and the image file's sha256)
    load_captioner(model_dir, question, settings) -> generate.Captioner
    with_question(captioner, question, settings) -> the same model asking another question
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io as stdlib_io
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

from xpsr_jax.captions import generate, io, transforms, work
from xpsr_jax.captions.config import SIMPLE_WORD_LIMIT, limit_words


@dataclass(frozen=True)
class CaptionSettings:
    task: str
    question: str
    model_name: str  # recorded in each record
    model_fingerprint: str = ""  # provenance.model_fingerprint of the folder; recorded when given
    question_preset: str = "official"  # "simple": answers cut to SIMPLE_WORD_LIMIT words
    caption_transform: str = ""  # a transforms spec: what the model sees
    batch_size: int = 8
    max_new_tokens: int = 200
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    prompt_template: str | None = None


def check_same_question(records: Iterable[dict], task: str, question: str, path,
                        caption_transform: str = "") -> None:
    """A file must not mix two questions (or two caption transforms) for one task: resuming
    would skip the wrong ones."""
    for record in records:
        if record["task"] == task and record["question"] != question:
            raise io.CaptionInputError(
                f"{path} already holds {task} captions for the question {record['question']!r}, "
                f"not {question!r}; use another --output or the same --question"
            )
        if record["task"] == task and record.get("caption_transform", "") != caption_transform:
            raise io.CaptionInputError(
                f"{path} already holds {task} captions made with --caption-transform "
                f"{record.get('caption_transform', '')!r}, not {caption_transform!r}; use another --output"
            )


def load_images(batch: list[work.WorkItem], caption_transforms=()) -> tuple[list[Image.Image], list[str]]:
    """Decoded RGB images of a batch, as the model is to see them (`caption_transforms` applied),
    and the sha256 of each file's bytes (those decoded: what the caption is of); CaptionInputError
    names an unreadable file."""
    images, digests = [], []
    for item in batch:
        try:
            data = item.path.read_bytes()
            with Image.open(stdlib_io.BytesIO(data)) as image:
                images.append(transforms.apply_transforms(image.convert("RGB"), caption_transforms))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise io.CaptionInputError(f"cannot read image {str(item.path)!r}: {error}") from None
        digests.append(hashlib.sha256(data).hexdigest())
    return images, digests


def prefetched(batches: Iterable, load: Callable, pool: concurrent.futures.Executor) -> Iterator:
    """Yields ``(batch, load(batch))``, loading the next batch while the caller works."""
    queue = deque()
    for batch in batches:
        queue.append((batch, pool.submit(load, batch)))
        if len(queue) > 1:
            done_batch, future = queue.popleft()
            yield done_batch, future.result()
    while queue:
        done_batch, future = queue.popleft()
        yield done_batch, future.result()


def caption_items(captioner: generate.Captioner, items: list[work.WorkItem], settings: CaptionSettings,
                  writer: io.CaptionWriter, progress=None) -> int:
    """Answers `settings.question` for every item, appending one record per image to `writer`
    batch by batch; returns how many were written. `progress`: a tqdm bar to advance."""
    caption_transforms = transforms.parse_transforms(settings.caption_transform)
    spec = transforms.describe(caption_transforms)
    written = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        batches = work.batched(items, settings.batch_size)
        for batch, (images, digests) in prefetched(batches, lambda b: load_images(b, caption_transforms), pool):
            texts = captioner.caption(images, settings.max_new_tokens, settings.do_sample, settings.temperature,
                                      settings.top_p)
            if settings.question_preset == "simple":
                texts = [limit_words(text, SIMPLE_WORD_LIMIT) for text in texts]
            writer.write(_record(item, text, digest, settings, spec)
                         for item, text, digest in zip(batch, texts, digests, strict=True))
            written += len(batch)
            if progress is not None:
                progress.update(len(batch))
    return written


def _record(item: work.WorkItem, text: str, image_sha256: str, settings: CaptionSettings, spec: str) -> dict:
    record = {"image_id": item.image_id, "source": item.source, "task": settings.task, "text": text,
              "model": settings.model_name, "question": settings.question, "caption_transform": spec}
    if settings.model_fingerprint:
        record["model_fingerprint"] = settings.model_fingerprint
    record["image_sha256"] = image_sha256
    return record


def load_captioner(model_dir: str, question: str, settings: CaptionSettings, device: str | None,
                   dtype_name: str) -> generate.Captioner:
    """The model of `model_dir` on `device` (None: cuda if available) in `dtype_name`; a folder
    that is not a loadable image-text model is one CaptionInputError naming it."""
    device = generate.resolve_device(device)
    dtype = generate.resolve_dtype(dtype_name, device)
    try:
        return generate.Captioner.load(model_dir, question, device, dtype, settings.prompt_template)
    except io.CaptionInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise io.CaptionInputError(f"captioning model {model_dir!r} does not load as an image-text-to-text model "
                                   f"in {dtype} on {device}: {first}") from None


def with_question(captioner: generate.Captioner, question: str, model_dir: str,
                  settings: CaptionSettings) -> generate.Captioner:
    """A captioner on the same loaded model that asks `question` (one model answers both kinds)."""
    prompt = generate.build_prompt(captioner.processor, question, settings.prompt_template, model_dir)
    return generate.Captioner(captioner.processor, captioner.model, prompt, captioner.device, captioner.dtype)
