"""Tests for the procedural synthetic faces source."""

import dataclasses
import os

import numpy as np
import pytest

from hdb_jax.toy import synthetic as S


def _render(i, index=0, res=32, **kw):
    return S.render_face(S.identity(i), S.variation(i, index, **kw), res)


def _small(img, factor=4):
    """Box-downsamples a uint8 [H, W, 3] image to float [H/f, W/f, 3]."""
    h, w, c = img.shape
    return img.astype(np.float64).reshape(h // factor, factor, w // factor, factor, c).mean((1, 3))


def test_render_shape_dtype_and_determinism():
    for res in (32, 64, 96):
        a, b = _render(7, 2, res), _render(7, 2, res)
        assert a.shape == (res, res, 3) and a.dtype == np.uint8
        assert a.tobytes() == b.tobytes()
    assert S.identity(7) == S.identity(7)
    assert S.variation(7, 2) == S.variation(7, 2)
    assert S.identity(7, seed=1) != S.identity(7, seed=0)


def test_images_are_not_flat():
    img = _render(3, res=64).astype(np.float64)
    assert img.std() > 20  # background, skin, hair... not a blank canvas
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_different_ids_differ():
    idents = [S.identity(i) for i in range(8)]
    assert len(set(idents)) == 8
    assert len({(x.skin, x.face_ratio, x.eye_spacing) for x in idents}) == 8
    bg = dict(background="gray")
    for i in range(7):
        diff = np.abs(_render(i, **bg).astype(int) - _render(i + 1, **bg).astype(int))
        assert diff.mean() > 3.0, i


def test_attribute_frequencies_roughly_match():
    idents = [S.identity(i) for i in range(400)]
    assert 0.2 < np.mean([x.glasses for x in idents]) < 0.4
    assert 0.12 < np.mean([x.hat for x in idents]) < 0.28
    assert 0.17 < np.mean([x.earrings for x in idents]) < 0.33
    assert {x.hair_style for x in idents} == {S.HAIR_SHORT, S.HAIR_LONG, S.HAIR_BALD}


def test_same_identity_closer_than_different_identities():
    # Fixed background so the comparison is about the face, not the backdrop.
    n_ids, n_var = 8, 4
    imgs = np.stack(
        [[_small(_render(i, k, background="gray")) for k in range(n_var)] for i in range(n_ids)]
    )  # [ids, variants, 8, 8, 3]
    flat = imgs.reshape(n_ids, n_var, -1)
    dist = np.linalg.norm(flat[:, :, None, None] - flat[None, None], axis=-1)
    dist = dist.transpose(0, 2, 1, 3)  # [id_a, id_b, var_a, var_b]
    same = np.mean([dist[i, i][np.triu_indices(n_var, 1)].mean() for i in range(n_ids)])
    different = np.mean([dist[i, j].mean() for i in range(n_ids) for j in range(n_ids) if i != j])
    assert same < 0.8 * different, (same, different)


def test_variations_differ_and_accept_overrides():
    a, b = _render(5, 0, background="blue"), _render(5, 1, background="blue")
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0
    var = S.variation(5, 0, style="cartoon", background="red")
    assert (var.style, var.background) == ("cartoon", "red")
    with pytest.raises(ValueError):
        S.variation(5, 0, style="oil painting")
    with pytest.raises(ValueError):
        S.variation(5, 0, background="teal")


def test_background_colour_is_used():
    for name in ("red", "green", "blue"):
        img = _render(2, res=32, background=name).astype(np.float64)
        corner = img[:3, :3].reshape(-1, 3).mean(0)
        channel = {"red": 0, "green": 1, "blue": 2}[name]
        assert corner.argmax() == channel, (name, corner)


def test_styles():
    sketch = _render(4, res=48, style="sketch")
    assert np.array_equal(sketch[..., 0], sketch[..., 1])
    assert np.array_equal(sketch[..., 1], sketch[..., 2])
    photo, cartoon = _render(4, res=48), _render(4, res=48, style="cartoon")
    assert np.abs(photo.astype(int) - cartoon.astype(int)).mean() > 2.0
    # Cartoons have dark outlines: many more near-black pixels than the photo.
    dark = lambda im: (im.max(-1) < 40).sum()
    assert dark(cartoon) > dark(photo) + 20


def test_accessories_change_the_image():
    ident = next(S.identity(i) for i in range(100) if not S.identity(i).glasses)
    var = S.variation(ident.identity_id, 0, background="gray")
    plain = S.render_face(ident, var, 64)
    for field in ("glasses", "hat", "earrings"):
        if getattr(ident, field):
            continue
        extra = S.render_face(dataclasses.replace(ident, **{field: True}), var, 64)
        changed = np.abs(extra.astype(int) - plain.astype(int)).max(-1) > 30  # [H, W]
        assert changed.sum() > 5, field


def test_caption_mentions_accessories_and_background():
    seen = set()
    for i in range(60):
        ident = S.identity(i)
        for style in ("photo", "cartoon"):
            var = S.variation(i, 1, style=style)
            text = S.caption(ident, var)
            words = text.split()
            assert text.startswith(f"a {style} of a face")
            assert ("glasses" in words) == ident.glasses
            assert ("hat" in words) == ident.hat
            assert ("earrings" in words) == ident.earrings
            assert f"{var.background} background" in text
            assert set(words) <= S.VOCAB
            seen |= {w for w in ("glasses", "hat", "earrings") if w in words}
    assert seen == {"glasses", "hat", "earrings"}
    assert "an orange background" in S.caption(S.identity(0), S.variation(0, 0, background="orange"))
    assert "background" not in S.caption(S.identity(0), S.variation(0, 0, style="sketch"))


def test_caption_token_and_class_word():
    ident, var = S.identity(10), S.variation(10, 0, background="red")
    words = S.caption(ident, var, token="sks").split()
    assert words[:4] == ["a", "photo", "of", "sks"] and words[4] == "face"
    words = S.caption(ident, var, class_word="person", token="sks").split()
    assert words.index("sks") + 1 == words.index("person")
    assert S.caption(ident, var, class_word="avatar").startswith("a photo of an avatar")


def test_source_items():
    src = S.SyntheticFaces(
        identities=[3, 9], images_per_identity=3, resolution=32, styles=("photo", "cartoon"), token="sks"
    )
    assert len(src) == 6
    ex = src[4]
    assert (ex["identity"], ex["index"]) == (9, 1)
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["caption"].startswith("a cartoon of sks face")
    assert src[-1]["index"] == 2 and src[0]["caption"].startswith("a photo of sks face")
    assert np.array_equal(
        src[4]["image"], S.SyntheticFaces([3, 9], 3, 32, styles=("photo", "cartoon"))[4]["image"]
    )
    with pytest.raises(IndexError):
        src[6]
    assert "caption" not in S.SyntheticFaces([1], 1, 32, with_captions=False)[0]


def test_batches():
    src = S.SyntheticFaces(identities=range(5), images_per_identity=2, resolution=16)
    batches = list(src.batches(4, epoch_seed=1))
    assert len(batches) == 2  # 10 examples, remainder dropped
    b = batches[0]
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() < 0 < b["image"].max() <= 1.0
    assert b["identity"].dtype == np.int32 and b["identity"].shape == (4,)
    assert isinstance(b["caption"], list) and len(b["caption"]) == 4
    # The images match the items they claim to be.
    for k in range(4):
        item = src[int(b["identity"][k]) * 2 + int(b["index"][k])]
        assert np.allclose(b["image"][k], item["image"] / 127.5 - 1.0, atol=1e-6)

    again = list(src.batches(4, epoch_seed=1))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(batches, again))
    order = lambda bs: [(int(i), int(j)) for b in bs for i, j in zip(b["identity"], b["index"])]
    assert order(list(src.batches(4, epoch_seed=2))) != order(batches)

    full = list(src.batches(4, shuffle=False, drop_remainder=False))
    assert [len(x["caption"]) for x in full] == [4, 4, 2]
    assert order(full) == [(i, j) for i in range(5) for j in range(2)]


def test_save_folder(tmp_path):
    from PIL import Image

    src = S.SyntheticFaces(identities=[12, 4], images_per_identity=2, resolution=24)
    paths = S.save_folder(src, str(tmp_path / "faces"))
    names = sorted(os.listdir(tmp_path / "faces"))
    assert names == ["id00004_00.png", "id00004_01.png", "id00012_00.png", "id00012_01.png"]
    assert len(paths) == 4
    loaded = np.asarray(Image.open(tmp_path / "faces" / "id00012_01.png").convert("RGB"))
    assert np.array_equal(loaded, src[1]["image"])
