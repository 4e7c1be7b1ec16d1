"""The caption JSONL files: listing images, appending, resuming, merging, loading.

One record per line::

    {"image_id": str, "source": "lr"|"hr", "task": "highlevel"|"lowlevel",
     "text": str, "model": str, "question": str}

and, optionally, ``caption_transform`` (what the model saw), ``model_fingerprint`` (of the model
folder's files) and ``image_sha256`` (of the image file's bytes): what a resume checks before it
reuses a record (see ``provenance``).

A record is keyed by ``(image_id, source, task)``. Files are append-only and
each record is one ``write`` ending in a newline, so a killed run can leave at
most one partial last line; readers drop it, ``repair_partial_tail`` cuts it
off before appending again.

Public API:
    list_images(folder) -> list[pathlib.Path]
    read_records(path) -> tuple[list[dict], int]
    repair_partial_tail(path) -> list[dict]
    CaptionWriter(path).write(records)
    replace_records(path, records)          the whole file, atomically
    shard_output_path(output, shard, num_shards) -> pathlib.Path
    merge_caption_files(paths, out) -> int
    load_captions(path_or_paths) -> dict[tuple[str, str, str], str]
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Sequence

from xpsr_jax.captions.config import TASKS
from xpsr_jax.files import image_files

SOURCES = ("lr", "hr")
RECORD_FIELDS = ("image_id", "source", "task", "text", "model", "question")
OPTIONAL_FIELDS = ("caption_transform", "model_fingerprint", "image_sha256")  # strings when present

PathLike = str | os.PathLike
CaptionKey = tuple[str, str, str]  # (image_id, source, task)


class CaptionInputError(ValueError):
    """Bad input to the caption tools; the message names the file / value."""


def record_key(record: dict) -> CaptionKey:
    """``(image_id, source, task)`` of a record."""
    return record["image_id"], record["source"], record["task"]


def list_images(folder: PathLike) -> list[pathlib.Path]:
    """Image files directly in ``folder`` (``xpsr_jax.files.image_files``), sorted by name.

    Raises CaptionInputError when the folder is missing, holds no images, or
    two files share a stem (the stem is the image id).
    """
    return image_files(folder, "image folder", unique_stems=True, error=CaptionInputError)


def validate_record(record: object, where: str) -> dict:
    """Checks one parsed record; ``where`` ("file:line") goes into the error."""
    if not isinstance(record, dict):
        raise CaptionInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise CaptionInputError(
            f"{where}: record lacks field(s) {missing}; needs {list(RECORD_FIELDS)}"
        )
    for field in (*RECORD_FIELDS, *(f for f in OPTIONAL_FIELDS if f in record)):
        if not isinstance(record[field], str):
            raise CaptionInputError(
                f"{where}: field {field!r} must be a string, got {record[field]!r}"
            )
    if record["source"] not in SOURCES:
        raise CaptionInputError(f"{where}: source {record['source']!r} is not one of {SOURCES}")
    if record["task"] not in TASKS:
        raise CaptionInputError(f"{where}: task {record['task']!r} is not one of {TASKS}")
    return record


def check_caption_file(path: PathLike) -> None:
    """CaptionInputError unless ``path`` is a regular file or does not exist: a folder, a link to
    nothing or a link loop, a FIFO or device (reading it could block) are named."""
    path = pathlib.Path(path)
    if path.is_symlink() and not path.exists():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise CaptionInputError(f"caption file {str(path)!r} is a link to nothing or a link loop (-> {target})")
    if path.is_dir():
        raise CaptionInputError(f"caption file {str(path)!r} is a folder, not a JSONL file")
    if path.exists() and not path.is_file():
        raise CaptionInputError(f"caption file {str(path)!r} is not a regular file (a FIFO or device?)")


def read_records(path: PathLike) -> tuple[list[dict], int]:
    """Records of a caption file and the byte length of its complete lines.

    A last line without its newline is kept when it is a whole record (a file written by hand or
    by another tool); otherwise it is what a killed run leaves, and is dropped with a warning.
    Any other unreadable line is an error. A missing file reads as empty.
    """
    path = pathlib.Path(path)
    check_caption_file(path)
    if not path.exists():
        return [], 0
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CaptionInputError(f"caption file {str(path)!r}: cannot read it ({error.strerror or error})") from None
    complete_len = data.rfind(b"\n") + 1
    tail_record = None
    if complete_len < len(data) and data[complete_len:].strip():
        try:
            tail_record = validate_record(json.loads(data[complete_len:]), f"{path}: last line")
        except (json.JSONDecodeError, UnicodeDecodeError, CaptionInputError):
            warnings.warn(
                f"{path}: dropping a partial last line ({len(data) - complete_len} bytes): it is not "
                "a whole record (an interrupted run leaves one)",
                stacklevel=2,
            )
        else:
            complete_len = len(data)
    records = []
    for number, line in enumerate(data[:complete_len].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            parsed = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CaptionInputError(
                f"{where}: not a JSON record ({error}); only the last line of a caption file "
                "may be damaged by an interrupted run"
            ) from None
        records.append(validate_record(parsed, where))
    if tail_record is not None:
        records.append(tail_record)
    return records, complete_len


def repair_partial_tail(path: PathLike) -> list[dict]:
    """Cuts a partial last line off ``path`` (if any), ends a whole last record with its newline
    (so appends start on a line of their own), and returns the records."""
    records, complete_len = read_records(path)
    path = pathlib.Path(path)
    try:
        if path.exists() and path.stat().st_size > complete_len:
            with open(path, "r+b") as f:
                f.truncate(complete_len)
                f.flush()
                os.fsync(f.fileno())
        if complete_len:
            with open(path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
    except OSError as error:
        raise CaptionInputError(f"caption file {str(path)!r}: cannot repair its last line ({error.strerror or error}); "
                                "make it writable or give another file") from None
    return records


class CaptionWriter:
    """Appends records to a caption file; each ``write`` is flushed and fsynced.

    Usage: ``with CaptionWriter(path) as writer: writer.write([record, ...])``.
    """

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)
        check_caption_file(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
        except OSError as error:
            raise CaptionInputError(f"cannot write the caption file {str(self.path)!r} "
                                    f"({error.strerror or error}); make its folder writable or give another "
                                    "file") from None

    def write(self, records: Iterable[dict]) -> None:
        """Appends ``records`` and makes them durable before returning."""
        data = b"".join(encode_record(r) for r in records)
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:  # disk full, ...: what was written before stays, a rerun resumes
            raise CaptionInputError(f"writing the caption file {str(self.path)!r} failed "
                                    f"({error.strerror or error}); the records written before are kept: "
                                    "rerun the same command to resume") from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaptionWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def encode_record(record: dict) -> bytes:
    """One JSONL line. Text that is not valid Unicode (a file name or flag in another encoding) is
    written as JSON escapes, so the line stays UTF-8 and reads back as the same string."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


def replace_records(path: PathLike, records: Iterable[dict]) -> None:
    """Writes ``records`` as the whole of ``path``, atomically: a temporary file beside it, fsynced,
    renamed over it, the folder fsynced. A crash leaves the old file or the new one, never a mix."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # left over by an interrupted rewrite
        with open(tmp, "wb") as f:
            f.write(b"".join(encode_record(r) for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as error:
        raise CaptionInputError(f"cannot rewrite the caption file {str(path)!r} ({error.strerror or error}); "
                                "make its folder writable or give another file") from None


def shard_output_path(output: PathLike, shard: int, num_shards: int) -> pathlib.Path:
    """The file shard ``shard`` of ``num_shards`` writes: ``output`` itself for one
    shard, else ``{stem}.shard-{i}-of-{n}.jsonl`` beside it (``out.jsonl`` ->
    ``out.shard-0-of-4.jsonl``), so parallel processes never share a file."""
    output = pathlib.Path(output)
    if num_shards == 1:
        return output
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.shard-{shard}-of-{num_shards}.jsonl")


def collect_records(paths: Sequence[PathLike]) -> dict[CaptionKey, dict]:
    """Records of several caption files keyed by ``(image_id, source, task)``.

    Exact repeats are dropped. Raises CaptionInputError when a file is missing,
    one key has two different texts, or one task was asked with two questions
    (files from different runs mixed up).
    """
    by_key: dict[CaptionKey, dict] = {}
    origin: dict[CaptionKey, str] = {}
    question_of_task: dict[str, tuple[str, str]] = {}
    for path in paths:
        if pathlib.Path(path).is_dir():
            raise CaptionInputError(f"caption file {str(path)!r} is a folder; give the captions JSONL file in it")
        check_caption_file(path)
        if not pathlib.Path(path).is_file():
            raise CaptionInputError(f"caption file {str(path)!r} does not exist")
        records, _ = read_records(path)
        for record in records:
            key = record_key(record)
            task = record["task"]
            seen_question = question_of_task.setdefault(task, (record["question"], str(path)))
            if seen_question[0] != record["question"]:
                raise CaptionInputError(
                    f"task {task!r} was asked two questions: {seen_question[0]!r} in "
                    f"{seen_question[1]} and {record['question']!r} in {path}"
                )
            if key in by_key and by_key[key]["text"] != record["text"]:
                raise CaptionInputError(
                    f"conflicting captions for image_id={key[0]!r} source={key[1]!r} "
                    f"task={key[2]!r} in {origin[key]} and {path}"
                )
            if key not in by_key:
                by_key[key] = record
                origin[key] = str(path)
    return by_key


def merge_caption_files(paths: Sequence[PathLike], out: PathLike) -> int:
    """Merges caption files (e.g. shards) into ``out``; returns the record count.

    Deduplicates and checks consistency as ``collect_records`` does; writes
    records sorted by (task, source, image_id) to a temporary file first, so
    ``out`` is replaced whole or not at all (it may also be one of ``paths``).
    """
    if not paths:
        raise CaptionInputError("merge_caption_files needs at least one input file")
    records = collect_records(paths)
    out = pathlib.Path(out)
    check_caption_file(out)
    ordered = sorted(records.values(), key=lambda r: (r["task"], r["source"], r["image_id"]))
    replace_records(out, ordered)
    return len(ordered)


def load_captions(path: PathLike | Sequence[PathLike]) -> dict[CaptionKey, str]:
    """``{(image_id, source, task): text}`` from one caption file or several (shards)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return {key: record["text"] for key, record in collect_records(paths).items()}
