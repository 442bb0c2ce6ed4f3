"""Many identities from real-photo layouts: a folder of identities and TFDS, through stages 1-2."""

import io
import os
import stat
import tarfile
import warnings

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from hdb_jax.blocks import build
from hdb_jax.data import folder, identities
from hdb_jax.data import weights as weights_lib


def _photo(path, seed, size=(80, 72)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path)


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    root = tmp_path_factory.mktemp("people")
    for name, good in (("alice", 3), ("bob", 2), ("carol", 0)):
        (root / name).mkdir()
        for k in range(good):
            _photo(root / name / f"{k}.png", hash(name) % 100 + k)
    (root / "alice" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "carol" / "notes.txt").write_text("no photos here")
    (root / ".cache").mkdir()  # hidden: ignored
    return root


def test_folder_of_identities_skips_bad_files_and_empty_identities(people):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = identities.FolderIdentities(str(people), 32, min_views=1)
    assert source.identities == ("alice", "bob")
    message = " ".join(str(w.message) for w in caught if issubclass(w.category, folder.BadImagesWarning))
    assert "broken.jpg" in message and "carol" in message
    views = source.views("alice")
    assert views.shape == (3, 32, 32, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(
        source.views("bob", [0, 1, 2]), source.views("bob")[[0, 1, 0]]
    )  # wraps around
    with pytest.raises(folder.NoImagesError, match="no usable identity"):
        identities.FolderIdentities(str(people / "carol"), 32)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        identities.FolderIdentities(str(people / "nowhere"), 32)


def test_folder_of_identities_trains_preopt_and_a_hypernetwork_step(people, tmp_path):
    from hdb_jax.stages import hypernet as hypernet_train
    from hdb_jax.stages import preopt

    config = load_config("preopt", "tiny")
    config.workdir, config.steps, config.chunk_size, config.mesh.data = str(tmp_path / "pre"), 2, 2, 1
    config.data.source, config.data.folder = "folder", str(people)
    sd, params = build.base_model(config.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", folder.BadImagesWarning)
        out = preopt.train(config, sd, params)
        rows, trees = weights_lib.load(config.workdir)
        assert sorted(out.trained) == ["alice", "bob"] == sorted(r["identity"] for r in rows)
        assert rows[0]["source"].startswith("folder:")
        hyper = load_config("hypernet", "tiny")
        hyper.workdir, hyper.steps, hyper.batch_size, hyper.mesh.data = str(tmp_path / "hyp"), 1, 2, 1
        hyper.data.source, hyper.data.folder, hyper.data.preopt_dir = "folder", str(people), config.workdir
        hyper.data.heldout, hyper.adapter.basis_file = (
            (),
            os.path.join(config.workdir, "lidb_basis.safetensors"),
        )
        result = hypernet_train.train(hyper, sd, params)
    assert result.loop.step == 1 and np.isfinite(result.loop.last())
    assert (
        0 < np.isfinite(result.r2_train)
        and (tmp_path / "hyp" / "hypernet" / "hypernet.safetensors").is_file()
    )


def test_tfds_images_as_identities_from_a_manual_dir(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from hdb_jax.data import tfds_source

    manual = tmp_path / "manual"
    manual.mkdir()
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    with tarfile.open(manual / "data8x8.tar", "w") as tar:  # the layout CelebA-HQ's builder reads
        for i, color in enumerate(colors):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), color).save(buf, "PNG")
            info = tarfile.TarInfo(f"imgHQ{i:05d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    data = dict(
        source="tfds",
        tfds_name=tfds_source.celeba_hq_builder_name(8),
        split="train",
        data_dir=str(tmp_path / "data"),
        manual_dir=str(manual),
        count=3,
    )
    source = identities.from_config(data, 8)
    assert source.identities == (0, 1, 2) and source.views_per_identity == 1
    got = sorted(tuple(source.views(i)[0, 0, 0]) for i in source.identities)
    assert got == sorted(colors)
    assert identities.from_config(data, 8, [2]).identities == (2,)


def test_gif_and_decompression_bomb_and_basis_permissions(tmp_path):
    pal = Image.new("P", (80, 80), 1)
    pal.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    pal.save(tmp_path / "palette.gif")
    image = folder.load_image(str(tmp_path / "palette.gif"), 32)
    assert image.shape == (32, 32, 3) and tuple(image[5, 5]) == (200, 30, 60)
    Image.new("1", (9500, 9500)).save(tmp_path / "bomb.png")  # 90 Mpx in a few KB: Pillow's bomb guard fires
    with pytest.raises(folder.BadImageError, match="too large"):
        folder.load_image(str(tmp_path / "bomb.png"), 32, max_pixels=10**12)
    from hdb_jax.adapters import basis as basis_io

    basis_io.save_basis(tmp_path / "basis.safetensors", {"layer": {"a_aux": np.eye(3, dtype=np.float32)}})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "basis.safetensors").st_mode) == 0o666 & ~umask
