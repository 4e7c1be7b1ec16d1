"""Reading TensorBoard event files in tests: TFRecord framing (length, masked CRC-32C of the
length, payload, masked CRC-32C of the payload), then tensorboardX's Event protobuf. An oracle
for what `xpsr_jax.training.metrics` writes, with TensorBoard's purge rule for resumed runs."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event


def _masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: str | Path) -> list[Event]:
    """Every Event of one file; ValueError on a bad CRC or a truncated record."""
    data, offset, events = Path(path).read_bytes(), 0, []
    while offset < len(data):
        header = data[offset:offset + 12]
        if len(header) < 12:
            raise ValueError(f"{path}: truncated record header at byte {offset}")
        (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
        if length_crc != _masked(header[:8]):
            raise ValueError(f"{path}: bad length CRC at byte {offset}")
        payload = data[offset + 12:offset + 12 + length]
        footer = data[offset + 12 + length:offset + 16 + length]
        if len(payload) < length or len(footer) < 4:
            raise ValueError(f"{path}: truncated record at byte {offset}")
        if struct.unpack("<I", footer)[0] != _masked(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {offset}")
        events.append(Event.FromString(payload))
        offset += 16 + length
    return events


def read_scalars(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows it: files in name order, and a SessionLog(START)
    at step s drops the values already read for steps >= s."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                for series in scalars.values():
                    for step in [s for s in series if s >= event.step]:
                        del series[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars
