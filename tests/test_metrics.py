"""The metric writer's event files, read back by TensorBoard's own reader."""

import numpy as np
import pytest

from hdb_jax.common import images, metrics


def _events(logdir):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = loader.EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_reads_scalars_images_text_and_hparams(tmp_path):
    grid = images.grid(
        np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 128, 255)]), cols=3
    )  # [4, 12, 3]
    with metrics.Writer(tmp_path) as writer:
        writer.scalars(1, {"loss": 0.5, "grad_norm": np.float32(2.25)})
        writer.scalars(10, {"loss": 0.125})
        writer.images(10, {"val/samples": grid})
        writer.text(0, "config", "lr: 1e-3")
        writer.hparams({"lr": 1e-3, "adapter": "lidb", "patterns": ("a", "b")}, {"final/loss": 0.125})
    acc = _events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (10, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm")] == [(1, 2.25)]
    (image,) = acc.Images("val/samples")
    assert (image.step, image.width, image.height) == (10, 12, 4)
    import io

    from PIL import Image

    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, grid)
    assert "config/text_summary" in acc.Tags()["tensors"]
    hp = _events(tmp_path / "hparams")
    assert [e.value for e in hp.Scalars("final/loss")] == [0.125]


def test_writer_refuses_a_float_image(tmp_path):
    with metrics.Writer(tmp_path) as writer, pytest.raises(ValueError, match="expected uint8"):
        writer.images(0, {"bad": np.zeros((4, 4, 3), np.float32)})


def test_inactive_writer_writes_nothing(tmp_path):
    with metrics.Writer(tmp_path / "off", active=False) as writer:
        writer.scalars(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()
