"""Tests of the image-folder source (hdb_jax.data.folder).

Every file is made by the tests in a temporary folder. The TFDS source is in test_tfds_source.py.
"""

import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from hdb_jax.data import folder
from hdb_jax.data.folder import BadImageError, BadImagesWarning, ImageFolder, NoImagesError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
GOOD = [
    "Upper.JPEG",
    "a_photo.jpg",
    "b_portrait.png",
    "c_square.webp",
    "d_bitmap.bmp",
    "e_exif.jpg",
    "f_cmyk.jpg",
    "g_gray16.png",
    "h_rgba.png",
    "i_palette.png",
]
BAD = {
    "notes.txt": "unsupported extension",
    "random.png": "corrupt",
    "text.jpg": "not an image",
    "tiny.png": "too small",
    "truncated.jpg": "truncated",
}


def _halves(w, h, left, right, mode="RGB"):
    """An image whose left half is ``left`` and right half ``right``."""
    img = Image.new(mode, (w, h), left)
    img.paste(Image.new(mode, (w - w // 2, h), right), (w // 2, 0))
    return img


def _noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _fill_subject_folder(d):
    """Writes the good and bad files of GOOD and BAD (plus ignored ones) into ``d``."""
    _noise(120, 90, 0).save(d / "a_photo.jpg", quality=90)
    _noise(70, 130, 1).save(d / "b_portrait.png")
    _noise(100, 100, 2).save(d / "c_square.webp", lossless=True)
    _noise(96, 80, 3).save(d / "d_bitmap.bmp")
    _noise(200, 150, 4).save(d / "Upper.JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display = rotate 90 degrees clockwise
    _halves(80, 64, RED, BLUE).save(d / "e_exif.jpg", quality=95, exif=exif)
    Image.new("RGB", (90, 90), (200, 60, 30)).convert("CMYK").save(d / "f_cmyk.jpg", quality=95)
    gray16 = np.full((80, 80), 32768, np.uint16)
    gray16[:, :40] = 65535
    Image.fromarray(gray16).save(d / "g_gray16.png")  # a 16-bit grayscale PNG
    _halves(80, 80, (0, 0, 0, 0), (0, 255, 0, 255), "RGBA").save(d / "h_rgba.png")
    pal = _halves(80, 80, 0, 1, "P")
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(d / "i_palette.png", transparency=0)  # index 0 (left) transparent
    Image.new("RGB", (1, 1), RED).save(d / "tiny.png")
    whole = _jpeg_bytes(_noise(128, 128, 5))
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "random.png").write_bytes(b"\0\xff" + np.random.default_rng(6).bytes(2000))
    (d / "text.jpg").write_text("these are not the pixels you are looking for\n")
    (d / "notes.txt").write_text("subject: sks\n")
    (d / ".DS_Store").write_bytes(b"\0\1\2")  # hidden: ignored silently
    (d / "nested").mkdir()
    _noise(64, 64, 7).save(d / "nested" / "deep.png")
    (d / ".hidden").mkdir()
    _noise(64, 64, 8).save(d / ".hidden" / "secret.png")


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("subject")
    _fill_subject_folder(d)
    return d


def _load_folder(directory, **kw):
    """Builds an ImageFolder and returns (folder, the BadImagesWarning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = ImageFolder(str(directory), **kw)
    return source, [str(w.message) for w in caught if issubclass(w.category, BadImagesWarning)]


@pytest.fixture(scope="module")
def subject(subject_dir):
    return _load_folder(subject_dir, resolution=32, caption="a photo of sks face")


def _by_name(source, name):
    return source[[os.path.basename(p) for p in source.paths].index(name)]["image"]


def test_loads_exactly_the_good_files_and_warns_once(subject, subject_dir):
    source, messages = subject
    assert [os.path.basename(p) for p in source.paths] == GOOD
    assert len(source) == len(GOOD)
    assert len(messages) == 1
    lines = messages[0].splitlines()
    assert str(subject_dir) in lines[0] and "5 of 15" in lines[0]
    reported = {}
    for line in lines[1:]:
        path, reason = line.strip().split(": ", 1)
        reported[os.path.basename(path)] = reason.split(" (")[0]
    assert reported == BAD
    assert {os.path.basename(p): r for p, r, _ in source.skipped} == BAD


def test_examples_shapes_and_types(subject):
    source, _ = subject
    for i in range(len(source)):
        ex = source[i]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert ex["path"] == source.paths[i] and ex["caption"] == "a photo of sks face"
    assert source[-1]["path"] == source.paths[-1]
    with pytest.raises(IndexError):
        source[len(source)]


def test_exif_orientation_is_applied(subject):
    img = _by_name(subject[0], "e_exif.jpg").astype(int)
    # Stored: left half red, right half blue. Rotated clockwise: red on top, blue below.
    top, bottom = img[:10].reshape(-1, 3).mean(0), img[-10:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_colour_layouts_become_rgb8(subject):
    source, _ = subject
    cmyk = _by_name(source, "f_cmyk.jpg").astype(int)
    assert np.abs(cmyk - (200, 60, 30)).max() <= 6
    gray = _by_name(source, "g_gray16.png").astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (gray[:, :12] == 255).all()  # 65535 -> 255, not clipped
    assert (np.abs(gray[:, 20:] - 128) <= 1).all()  # 32768 -> ~128
    rgba = _by_name(source, "h_rgba.png").astype(int)
    assert (rgba[:, :12] == WHITE).all() and (rgba[:, 20:] == GREEN).all()
    pal = _by_name(source, "i_palette.png").astype(int)
    assert (pal[:, :12] == WHITE).all() and (pal[:, 20:] == BLUE).all()


@pytest.mark.parametrize(
    "mode,values,expected",
    [
        ("I", [[0, 255]], [0, 255]),  # 8-bit range kept
        ("I", [[0, 65535]], [0, 255]),  # 16-bit range scaled
        ("F", [[0.0, 1.0]], [0, 255]),  # unit floats scaled
        ("L", [[0, 200]], [0, 200]),
    ],
)
def test_to_rgb8_grayscale_modes(mode, values, expected):
    dtype = {"I": np.int32, "F": np.float32, "L": np.uint8}[mode]
    img = Image.fromarray(np.array(values, dtype), mode)
    out = np.asarray(folder.to_rgb8(img))
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert out[0, :, 0].tolist() == expected and (out == out[..., :1]).all()
    la = Image.new("LA", (2, 1), (0, 0))  # fully transparent black -> white
    assert np.asarray(folder.to_rgb8(la)).tolist() == [[list(WHITE)] * 2]


@pytest.mark.parametrize(
    "size,resolution", [((100, 50), 50), ((101, 50), 50), ((200, 100), 50), ((50, 100), 50), ((100, 200), 40)]
)
def test_center_crop(tmp_path, size, resolution):
    """Three bands along the long side, the middle one exactly the centre square: all green."""
    w, h = size
    side, long = min(w, h), max(w, h)
    bands = np.zeros((long, side, 3), np.uint8)  # along axis 0 first
    start = (long - side) // 2
    bands[:start] = RED
    bands[start : start + side] = GREEN
    bands[start + side :] = BLUE
    arr = bands if h >= w else bands.transpose(1, 0, 2)
    path = tmp_path / "bands.png"
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
    out = folder.load_image(str(path), resolution, min_size=1)
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - GREEN).max() <= 1


def test_load_image_errors(subject_dir, tmp_path):
    with pytest.raises(BadImageError) as e:
        folder.load_image(str(subject_dir / "truncated.jpg"), 32)
    assert e.value.reason == folder.TRUNCATED
    with pytest.raises(BadImageError) as e:
        folder.load_image(str(subject_dir / "tiny.png"), 32)
    assert e.value.reason == folder.TOO_SMALL
    assert folder.load_image(str(subject_dir / "tiny.png"), 4, min_size=1).tolist() == [[list(RED)] * 4] * 4
    with pytest.raises(FileNotFoundError):
        folder.load_image(str(tmp_path / "missing.png"), 32)


def test_batches_layout_and_determinism(subject):
    source, _ = subject
    batches = list(source.batches(4, seed=0))
    assert len(batches) == 3  # ceil(10 / 4), the last one filled by cycling
    for b in batches:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["caption"] == ["a photo of sks face"] * 4 and b["index"].dtype == np.int32
    order = np.concatenate([b["index"] for b in batches])
    assert sorted(order[:10].tolist()) == list(range(10)) and order[10:].tolist() == order[:2].tolist()
    first = source[int(batches[0]["index"][0])]["image"].astype(np.float32)
    np.testing.assert_array_equal(batches[0]["image"][0], first / 127.5 - 1)
    again = list(source.batches(4, seed=0))
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    other = np.concatenate([b["index"] for b in source.batches(4, seed=1)])
    next_epoch = np.concatenate([b["index"] for b in source.batches(4, seed=0, epoch=1)])
    assert order.tolist() != other.tolist() and order.tolist() != next_epoch.tolist()
    plain = np.concatenate([b["index"] for b in source.batches(4, seed=0, shuffle=False)])
    assert plain[:10].tolist() == list(range(10))


def test_flip(subject_dir):
    source, _ = _load_folder(subject_dir, resolution=32, flip=True)
    flipped = checked = 0
    for _ in range(2):
        for b in source.batches(5, seed=3):
            for img, i in zip(b["image"], b["index"], strict=True):
                ref = source[int(i)]["image"].astype(np.float32) / 127.5 - 1.0
                if np.array_equal(ref, ref[:, ::-1]):  # the solid CMYK image, the EXIF one
                    continue
                checked += 1
                if np.array_equal(img, ref[:, ::-1]):
                    flipped += 1
                else:
                    np.testing.assert_array_equal(img, ref)
    assert 0 < flipped < checked
    runs = [np.stack([b["image"] for b in source.batches(5, seed=3)]) for _ in range(2)]
    np.testing.assert_array_equal(*runs)


def test_small_subject_set_cycles_and_repeats(tmp_path):
    for k in range(3):
        _noise(64, 80, 10 + k).save(tmp_path / f"{k}.png")
    source, messages = _load_folder(tmp_path, resolution=16)
    assert len(source) == 3 and messages == [] and "caption" not in next(source.batches(4, seed=0))
    (batch,) = source.batches(4, seed=0)
    assert batch["image"].shape == (4, 16, 16, 3) and set(batch["index"].tolist()) == {0, 1, 2}
    stream = source.batches(4, seed=0, repeat=True)
    order = np.concatenate([next(stream)["index"] for _ in range(3)])  # 12 = 4 epochs of 3
    for e in range(4):
        assert sorted(order[3 * e : 3 * e + 3].tolist()) == [0, 1, 2]


def test_recursive(subject_dir):
    source, messages = _load_folder(subject_dir, resolution=16, recursive=True)
    names = [os.path.relpath(p, subject_dir) for p in source.paths]
    assert os.path.join("nested", "deep.png") in names and len(names) == len(GOOD) + 1
    assert not any("secret" in n or "DS_Store" in n for n in names)
    assert len(messages) == 1 and "DS_Store" not in messages[0]


def test_empty_and_all_bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoImagesError, match="empty") as e:
        ImageFolder(str(empty), resolution=32)
    assert str(empty) in str(e.value) and isinstance(e.value, ValueError)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (10, 10)).save(bad / "small.png")
    (bad / "fake.jpg").write_text("hello")
    with pytest.warns(BadImagesWarning), pytest.raises(NoImagesError) as e:
        ImageFolder(str(bad), resolution=32)
    assert str(bad) in str(e.value)
    assert "1 not an image" in str(e.value) and "1 too small" in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(str(tmp_path / "nowhere"), resolution=32)


# --- TFDS -----------------------------------------------------------------------------
