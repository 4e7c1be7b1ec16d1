"""Training metrics on disk: `metrics.jsonl` lines and TensorBoard event files, no TensorFlow.

    writer = MetricsWriter(workdir)                 # process 0 only
    writer.truncate_after(step)                     # on resume: drop lines of lost steps
    writer.write(step, {"loss": 0.1, "mse": 0.09, ...})
    writer.close()

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (little-endian uint64 length,
masked CRC-32C of the length, payload, masked CRC-32C of the payload) around `Event` protobufs.
The few protobuf fields needed are encoded here by hand (`Event.wall_time` 1 double, `step` 2
int64, `file_version` 3 string, `summary` 5, `session_log` 6; `Summary.value` 1;
`Summary.Value.tag` 1 string, `simple_value` 2 float; `SessionLog.status` 1 enum). A resumed run
starts its file with `SessionLog(START)` at the resumed step, which tells TensorBoard to discard
the events of the steps after it that an interrupted run had already written.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# ----------------------------------------------------------------------------- CRC-32C


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses: crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def read_tfrecords(path: str | os.PathLike) -> Iterator[bytes]:
    """The payloads of a TFRecord file; raises ValueError on a bad CRC or a truncated record."""
    data = Path(path).read_bytes()
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {offset}")
        length_bytes = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        if length_crc != masked_crc32c(length_bytes):
            raise ValueError(f"{path}: bad length CRC at byte {offset}")
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {offset}")
        payload = data[start:end]
        (payload_crc,) = struct.unpack("<I", data[end:end + 4])
        if payload_crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {offset}")
        yield payload
        offset = end + 4


# ----------------------------------------------------------------------------- protobuf


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_scalar_summary(values: Mapping[str, float]) -> bytes:
    """A `Summary` with one `simple_value` per tag."""
    out = b""
    for tag, value in values.items():
        entry = _length_delimited(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", value)
        out += _length_delimited(1, entry)
    return out


def encode_event(*, wall_time: float, step: int, file_version: str | None = None,
                 summary: bytes | None = None, session_start: bool = False) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode("utf-8"))
    if summary is not None:
        out += _length_delimited(5, summary)
    if session_start:
        out += _length_delimited(6, _key(1, 0) + _varint(1))  # SessionLog.status = START
    return out


def _parse_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field, wire type, value) of a protobuf message: ints for varints, raw bytes otherwise."""
    offset = 0

    def varint() -> int:
        nonlocal offset
        result = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while offset < len(data):
        key = varint()
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield field, wire_type, varint()
        elif wire_type == 1:
            yield field, wire_type, data[offset:offset + 8]
            offset += 8
        elif wire_type == 2:
            length = varint()
            yield field, wire_type, data[offset:offset + length]
            offset += length
        elif wire_type == 5:
            yield field, wire_type, data[offset:offset + 4]
            offset += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def decode_event(payload: bytes) -> dict:
    """{"wall_time", "step", "file_version"?, "scalars": {tag: value}, "session_start"?}."""
    event: dict = {"step": 0, "scalars": {}}
    for field, _, value in _parse_fields(payload):
        if field == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3:
            event["file_version"] = value.decode("utf-8")
        elif field == 5:
            for _, _, entry in _parse_fields(value):
                parts = {f: v for f, _, v in _parse_fields(entry)}
                event["scalars"][parts[1].decode("utf-8")] = struct.unpack("<f", parts[2])[0]
        elif field == 6:
            event["session_start"] = dict((f, v) for f, _, v in _parse_fields(value)).get(1) == 1
    return event


def read_event_file(path: str | os.PathLike) -> list[dict]:
    return [decode_event(payload) for payload in read_tfrecords(path)]


def read_scalars(log_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file of `log_dir` in file order, applying
    SessionLog(START) purges as TensorBoard does (later events of a step replace earlier ones)."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in read_event_file(path):
            if event.get("session_start"):
                for series in scalars.values():
                    for step in [s for s in series if s >= event["step"]]:
                        del series[step]
            for tag, value in event["scalars"].items():
                scalars.setdefault(tag, {})[event["step"]] = value
    return scalars


class EventFileWriter:
    """Appends scalar events to a new `events.out.tfevents.<time>.<host>` file in `log_dir`."""

    def __init__(self, log_dir: str | os.PathLike, *, start_step: int | None = None):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        # A sequence suffix keeps two writers started in the same second apart.
        stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        index = len(list(log_dir.glob(stem + "*")))
        self.path = log_dir / (stem if index == 0 else f"{stem}.{index}")
        self._file = open(self.path, "ab")
        self._write(encode_event(wall_time=time.time(), step=0, file_version="brain.Event:2"))
        if start_step is not None:
            self._write(encode_event(wall_time=time.time(), step=start_step, session_start=True))
        self.flush()

    def _write(self, payload: bytes) -> None:
        self._file.write(tfrecord_frame(payload))

    def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {tag: float(v) for tag, v in values.items()}
        self._write(encode_event(wall_time=time.time(), step=step,
                                 summary=encode_scalar_summary(finite)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# ----------------------------------------------------------------------------- JSONL


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_number(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN / Infinity


class MetricsWriter:
    """`workdir/metrics.jsonl` (one line per logged step) plus TensorBoard scalars."""

    def __init__(self, workdir: str | os.PathLike, *, resumed_step: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.workdir / METRICS_FILE
        if resumed_step is not None:
            self.truncate_after(resumed_step)
        self._jsonl = open(self.jsonl_path, "a")
        self.events = EventFileWriter(self.workdir / TENSORBOARD_DIR, start_step=
                                      None if resumed_step is None else resumed_step + 1)

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps > `step`: an interrupted run logged steps its checkpoint lacks."""
        kept = [r for r in read_metrics_jsonl(self.jsonl_path) if r.get("step", 0) <= step]
        temporary = self.jsonl_path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(temporary, self.jsonl_path)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.events.add_scalars(step, values)
        self.events.flush()

    def close(self) -> None:
        self._jsonl.close()
        self.events.close()
