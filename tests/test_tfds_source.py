"""Tests of the TFDS source (hdb_jax.data.tfds_source): offline, from fake manual directories.

The TFDS tests proper are skipped without the ``tfds`` extra.
"""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def test_importing_hdb_jax_does_not_import_tensorflow():
    code = (
        "import sys, hdb_jax, hdb_jax.data.folder, hdb_jax.data.tfds_source\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', "
        "'tensorflow_datasets')]\nassert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tfds_missing_gives_pip_hint(monkeypatch):
    from hdb_jax.data import tfds_source

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install hdb_jax\[tfds\]"):
        tfds_source.tfds_images(
            "celeb_a_hq/8", "train", data_dir="unused", resolution=8, batch_size=2, seed=0
        )


def test_celeba_hq_builder_name():
    from hdb_jax.data.tfds_source import celeba_hq_builder_name

    assert celeba_hq_builder_name(256) == "celeb_a_hq/256"
    with pytest.raises(ValueError):
        celeba_hq_builder_name(300)


@pytest.fixture(scope="module")
def tfds_mod():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TF stays off any accelerator JAX may use
    return tfds


COLORS = [RED, GREEN, BLUE, (255, 255, 0), (0, 255, 255)]


def test_tfds_celeba_hq_from_manual_tar(tfds_mod, tmp_path):
    from hdb_jax.data.tfds_source import celeba_hq_builder_name, tfds_images

    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "data8x8.tar", "w") as tar:  # the layout the builder reads
        for i, color in enumerate(COLORS):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), color).save(buf, "PNG")
            info = tarfile.TarInfo(f"imgHQ{i:05d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    kw = dict(data_dir=str(tmp_path / "data"), manual_dir=str(manual), batch_size=2, seed=0)
    batches = list(tfds_images(celeba_hq_builder_name(8), "train", resolution=4, drop_remainder=False, **kw))
    assert [b["image"].shape for b in batches] == [(2, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3)]
    images = np.concatenate([b["image"] for b in batches])
    assert images.dtype == np.float32 and "label" not in batches[0]
    got = sorted(tuple(np.rint((img[0, 0] + 1) * 127.5).astype(int)) for img in images)
    assert got == sorted(COLORS)
    assert np.ptp(images, axis=(1, 2)).max() < 1e-5  # solid colours stay solid
    again = np.concatenate(
        [
            b["image"]
            for b in tfds_images(celeba_hq_builder_name(8), "train", resolution=4, drop_remainder=False, **kw)
        ]
    )
    np.testing.assert_array_equal(images, again)  # prepared once, same order for a seed


def test_tfds_local_builder_with_labels(tfds_mod, tmp_path):
    from hdb_jax.data.tfds_source import tfds_images

    tfds = tfds_mod

    class HdbTestShapes(tfds.core.GeneratorBasedBuilder):
        """Images of three colours (label = colour) of various sizes, from manual_dir."""

        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <label>/<name>.png files in manual_dir."

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(dl_manager.manual_dir)}

        def _generate_examples(self, root):
            for label in sorted(os.listdir(root)):
                for name in sorted(os.listdir(os.path.join(root, label))):
                    yield f"{label}/{name}", {"image": os.path.join(root, label, name), "label": int(label)}

    manual = tmp_path / "manual"
    sizes = [(12, 8), (8, 12), (10, 10), (16, 9)]
    for label in range(3):
        (manual / str(label)).mkdir(parents=True)
        for j, size in enumerate(sizes):
            img = Image.new("RGB", size, WHITE)  # margins outside the centre square: white
            side = min(size)
            img.paste(
                COLORS[label],
                ((size[0] - side) // 2, (size[1] - side) // 2, (size[0] + side) // 2, (size[1] + side) // 2),
            )
            img.save(manual / str(label) / f"{j}.png")
    kw = dict(
        data_dir=str(tmp_path / "data"),
        manual_dir=str(manual),
        resolution=6,
        label_key="label",
        batch_size=4,
        seed=1,
    )
    batches = list(tfds_images("hdb_test_shapes", "train", **kw))
    assert len(batches) == 3
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.dtype == np.int32 and sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    for b in batches:
        assert b["image"].shape == (4, 6, 6, 3) and b["image"].dtype == np.float32
        for img, label in zip(b["image"], b["label"], strict=True):
            np.testing.assert_allclose(
                img, np.broadcast_to(np.array(COLORS[label]) / 127.5 - 1, img.shape), atol=1e-5
            )
    again = np.concatenate([b["label"] for b in tfds_images("hdb_test_shapes", "train", **kw)])
    assert again.tolist() == labels.tolist()
    with pytest.raises(KeyError, match="no feature"):
        tfds_images("hdb_test_shapes", "train", **{**kw, "label_key": "identity"})


def test_tfds_never_downloads(tfds_mod, tmp_path):
    from hdb_jax.data.tfds_source import tfds_images

    with pytest.raises(RuntimeError, match="offline"):
        tfds_images("mnist", "train", data_dir=str(tmp_path), resolution=8, batch_size=2, seed=0)
