"""Scalar metrics: TensorBoard event files written on process 0, and a progress bar.

The event writer needs no TensorFlow: an event file is a sequence of TFRecord frames (length,
masked CRC-32C of the length, payload, masked CRC-32C of the payload) whose payloads are
``Event`` protocol buffers; the few fields we use (wall time, step, a scalar ``Summary.Value``)
are encoded by hand below. TensorBoard reads the files as usual.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(step: int, wall_time: float, scalars: Mapping[str, float] | None = None, file_version: str | None = None) -> bytes:
    """An ``Event`` proto: wall_time=1 (double), step=2 (int64), file_version=3, summary=5."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items()
        )
        out += _length_delimited(5, values)
    return out


class EventWriter:
    """Appends scalar summaries to a TensorBoard event file; a no-op on processes other than 0.

    Args:
      logdir: directory for the ``events.out.tfevents.*`` file.
    """

    def __init__(self, logdir: str | os.PathLike):
        self.active = jax.process_index() == 0
        self._file = None
        if self.active:
            os.makedirs(logdir, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            self.path = os.path.join(os.fspath(logdir), name)
            self._file = open(self.path, "ab")
            self._write(encode_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        header = struct.pack("<Q", len(payload))
        self._file.write(header + struct.pack("<I", _masked_crc(header)))
        self._file.write(payload + struct.pack("<I", _masked_crc(payload)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes one scalar per tag at ``step`` (values are fetched to host here)."""
        if self.active:
            host = {k: float(np.asarray(v)) for k, v in values.items()}
            self._write(encode_event(int(step), time.time(), host))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def progress(total: int, initial: int = 0, desc: str = "train"):
    """A tqdm bar on process 0 (disabled elsewhere)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=jax.process_index() != 0, dynamic_ncols=True)
