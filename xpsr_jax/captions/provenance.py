"""What a caption was made from: the model (its folder and a fingerprint of its files) and the image
(the SHA-256 of the file's bytes), so a record is reused only for the same model and the same image.

    model_fingerprint(folder) -> str                   sha256 of the model folder's configs and weights
    file_sha256(path) -> str                           sha256 of a file's bytes
    check_same_model(records, task, model, fingerprint, path)     CaptionInputError if another made them
    split_stale(records, current) -> (kept, stale)     records whose image is not the current file's

Records carry them as the optional fields `model_fingerprint` and `image_sha256`; readers that do not
know them ignore them.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterable, Mapping

from xpsr_jax.captions.io import CaptionInputError, CaptionKey, record_key
from xpsr_jax.files import update_sampled

SHORT = 12  # hex digits of a fingerprint shown in messages
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".model")  # configs, tokenizers, weight shards
def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the names, sizes and sampled contents of the model folder's configs, tokenizer
    and weight files (`weights_fingerprint` style): another model in the same folder changes it, and
    it reads a few MiB of a 7B model. CaptionInputError names an unreadable folder."""
    digest = hashlib.sha256()
    try:
        for path in sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file()):
            update_sampled(digest, path)
    except OSError as error:
        raise CaptionInputError(f"captioning model {str(folder)!r}: cannot read {error.filename or folder} "
                                f"({error.strerror or error})") from None
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes; CaptionInputError names an unreadable file."""
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise CaptionInputError(f"cannot read image {str(path)!r}: {error.strerror or error}") from None


def _same_folder(recorded: str, given: str) -> bool:
    if recorded == given:
        return True
    try:  # the same folder given another way (relative / absolute, a link)
        return pathlib.Path(recorded).resolve() == pathlib.Path(given).resolve()
    except (OSError, RuntimeError):
        return False


def check_same_model(records: Iterable[dict], task: str, model: str, fingerprint: str, path) -> None:
    """A file must not mix the captions of two models for one task, nor those of one folder before
    and after its weights changed: resuming would keep the other model's captions."""
    for record in records:
        if record["task"] != task:
            continue
        recorded = record.get("model_fingerprint", "")
        if not _same_folder(record["model"], model):
            was = f" (fingerprint {recorded[:SHORT]})" if recorded else ""
            raise CaptionInputError(
                f"{path} holds {task} captions made by the model {record['model']!r}{was}, not by {model!r} "
                f"(fingerprint {fingerprint[:SHORT]}); use another --output, or remove {path} to caption "
                f"again with {model!r}")
        if recorded and recorded != fingerprint:
            raise CaptionInputError(
                f"{path} holds {task} captions made by the model in {model!r} when it held other files "
                f"(fingerprint {recorded[:SHORT]}, now {fingerprint[:SHORT]}); use another --output, or remove "
                f"{path} to caption again with the model it holds now")


def split_stale(records: Iterable[dict], current: Mapping[CaptionKey, str], *,
                require_hash: bool = True) -> tuple[list[dict], list[dict]]:
    """(records to keep, stale records). A record whose key is in `current` (key -> the sha256 of the
    image file now under that name) is stale when its `image_sha256` differs, or when it has none
    and `require_hash`; a second record for a key already kept is stale too, so the kept records
    hold at most one caption per key. Records of other keys are kept as they are."""
    kept, stale, seen = [], [], set()
    for record in records:
        key = record_key(record)
        if key in current:
            recorded = record.get("image_sha256")
            fresh = recorded == current[key] if recorded or require_hash else True
            if not fresh or key in seen:
                stale.append(record)
                continue
            seen.add(key)
        kept.append(record)
    return kept, stale
