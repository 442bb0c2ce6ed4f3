"""Our TensorFlow-free event writer produces files TensorBoard reads back."""

import zlib

import numpy as np
import pytest

from hdb_jax import metrics


def test_crc32c_known_values():
    # RFC 3720 test vectors for CRC-32C (iSCSI).
    assert metrics.crc32c(b"") == 0
    assert metrics.crc32c(b"123456789") == 0xE3069283
    assert metrics.crc32c(bytes(32)) == 0x8A9136AA
    assert metrics.crc32c(b"123456789") != zlib.crc32(b"123456789")  # not plain CRC-32


def test_tensorboard_reads_our_events(tmp_path):
    loader_mod = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    writer = metrics.EventWriter(tmp_path)
    writer.scalars(1, {"loss": 0.5, "grad_norm": np.float32(2.25)})
    writer.scalars(10, {"loss": 0.125})
    writer.close()
    events = list(loader_mod.EventFileLoader(writer.path).Load())
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0])
           for e in events[1:] for v in e.summary.value]
    assert got == [(1, "loss", 0.5), (1, "grad_norm", 2.25), (10, "loss", 0.125)]
