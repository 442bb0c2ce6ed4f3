"""Personalisation from one photo: the hypernetwork bundle, the CLI, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import captured_constants_fail_above, load_config
from PIL import Image
from safetensors import safe_open

from hdb_jax import adapters as A
from hdb_jax.adapters import basis as basis_io
from hdb_jax.data import folder
from hdb_jax.formats import lora as export
from hdb_jax.formats import personal
from hdb_jax.hypernet import bundle as bundle_lib
from hdb_jax.hypernet.model import build_hypernet
from hdb_jax.jobs import personalize
from hdb_jax.sd import loading
from hdb_jax.sd import tiny as tiny_lib
from hdb_jax.sd.fingerprint import params_fingerprint
from hdb_jax.toy import base_model_dir, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ARCH = dict(
    encoder="tiny", iterations=2, mode="cross", num_blocks=1, num_heads=2, width=0, train_encoder=False
)
PATTERNS = {"unet": [A.PATTERNS["unet_attention"]], "text_encoder": [A.PATTERNS["text_attention"]]}


def write_bundle(directory, params, *, patterns=PATTERNS, fingerprint=None):
    """A randomly initialised hypernetwork bundle for ``params`` (no training needed)."""
    abstract = jax.eval_shape(lambda: params)
    kind = A.LiDB(a=16, b=8, rank=1)
    adapters = {c: A.Adapter.create(kind, abstract[c], p, c) for c, p in patterns.items()}
    net, init = build_hypernet(
        "tiny", adapters, kind, iterations=ARCH["iterations"], num_blocks=ARCH["num_blocks"], head_std=0.05
    )
    basis_file = os.path.join(directory, "source_basis.safetensors")
    _, digest = basis_io.load_or_create(basis_file, adapters, jax.random.PRNGKey(1))
    return bundle_lib.save(
        directory,
        net,
        init(jax.random.PRNGKey(2)),
        patterns=patterns,
        arch=ARCH,
        base_fingerprint=fingerprint or params_fingerprint(params),
        basis_file=basis_file,
        basis_hash=digest,
    )


@pytest.fixture(scope="module")
def toy():
    return loading.load_pretrained(base_model_dir())


@pytest.fixture(scope="module")
def bundle_dir(toy, tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle"), toy[1])


@pytest.fixture(scope="module")
def face_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "face.png"
    ident = synthetic.identity(3_000_123)
    Image.fromarray(synthetic.render_face(ident, synthetic.variation(3_000_123, 0), 96)).save(path)
    return path


def test_bundle_round_trip_and_refusals(toy, bundle_dir, tmp_path):
    sd, params = toy
    fp = params_fingerprint(params)
    loaded = bundle_lib.load(bundle_dir, jax.eval_shape(lambda: params), base_fingerprint=fp)
    n_layers = sum(len(a.targets) for a in loaded.adapters.values())
    assert len(loaded.meta["layout"]) == n_layers
    with safe_open(os.fspath(bundle_dir / bundle_lib.WEIGHTS), framework="numpy") as f:
        key = next(iter(f.keys()))
        stored = f.get_tensor(key)
    leaf = loaded.params
    for part in key.split("/"):
        leaf = leaf[part]
    np.testing.assert_array_equal(np.asarray(leaf), stored)

    # Another base model (same architecture, other weights): refused, naming both fingerprints.
    with pytest.raises(bundle_lib.BundleError, match=fp[:8]) as err:
        bundle_lib.load(bundle_dir, jax.eval_shape(lambda: params), base_fingerprint="0123456789abcdef")
    assert "0123456789abcdef" in str(err.value)

    # Another adapter layout: a bundle for UNet attention only, on a model with other blocks.
    other = tiny_lib.tiny(resolution=32, unet_channels=(32, 32, 64, 64))
    other_params = other.random_params(jax.random.PRNGKey(0))
    unet_only = write_bundle(tmp_path / "unet_only", other_params, patterns={"unet": PATTERNS["unet"]})
    with pytest.raises(bundle_lib.BundleError, match="weight tokens|adapter layout"):
        bundle_lib.load(unet_only, jax.eval_shape(lambda: params))

    # A corrupted basis is caught by its hash.
    (tmp_path / "bad").mkdir()
    for name in (bundle_lib.WEIGHTS, bundle_lib.BASIS):
        (tmp_path / "bad" / name).write_bytes((bundle_dir / name).read_bytes())
    raw = bytearray((tmp_path / "bad" / bundle_lib.BASIS).read_bytes())
    raw[-8:] = b"\x00" * 8
    (tmp_path / "bad" / bundle_lib.BASIS).write_bytes(bytes(raw))
    with pytest.raises(bundle_lib.BundleError, match="hash"):
        bundle_lib.load(tmp_path / "bad", jax.eval_shape(lambda: params))


def _cli(image, out, bundle, cache):
    cmd = [
        sys.executable,
        "-m",
        "hdb_jax.personalize",
        "--config",
        "configs/personalize.py",
        f"--image={image}",
        f"--out={out}",
        f"--config.bundle={bundle}",
        f"--config.compile_cache={cache}",
        "--config.relax.steps=3",
        "--config.relax.batch_size=2",
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_cli_writes_both_files_and_reuses_the_compile_cache(toy, bundle_dir, face_png, tmp_path):
    sd, params = toy
    reports = []
    for run in ("first", "second"):
        proc = _cli(face_png, tmp_path / run, bundle_dir, tmp_path / "cache")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "compile" in proc.stdout and "finetune" in proc.stdout  # the timing table
        # It talks: a line per phase as it starts, and where it wrote.
        phases = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
        assert [ln.split("] ")[1].split()[0] for ln in phases] == [
            "loading",
            "compiling",
            "predicting",
            "wrote",
        ]
        assert os.path.abspath(tmp_path / run) in phases[-1]
        reports.append(json.loads((tmp_path / run / "timings.json").read_text()))
    first, second = reports
    assert set(first["timings_s"]) == set(personalize.STAGES)
    assert second["timings_s"]["compile"] < first["timings_s"]["compile"]
    # The prediction and the finetune are traced and compiled once, then loaded as stored executables.
    assert first["programs"] == {"loaded": 0, "compiled": 2}
    assert second["programs"] == {"loaded": 2, "compiled": 0}
    assert len(first["losses"]) == 3 and all(np.isfinite(first["losses"]))

    # Our file: a LoRA of rank 4 + 1 (relaxed LoRA + the folded rank-1 prediction) tied to this base model.
    loaded = personal.load_personal(
        tmp_path / "first" / "personal.safetensors", base_fingerprint=params_fingerprint(params)
    )
    assert {a.kind.rank for a in loaded.adapters.values()} == {5}
    # The standard file: lora_A / lora_B for every adapted layer, as diffusers' loader expects.
    lora_file = tmp_path / "first" / "lora" / export.LORA_WEIGHT_NAME
    with safe_open(os.fspath(lora_file), framework="numpy") as f:
        keys = list(f.keys())
    n_layers = sum(len(a.targets) for a in loaded.adapters.values())
    assert (
        sum(k.endswith("lora_A.weight") for k in keys)
        == sum(k.endswith("lora_B.weight") for k in keys)
        == n_layers
    )
    # Same seed, same photo, same program: the two runs agree.
    again = personal.load_personal(tmp_path / "second" / "personal.safetensors", base_fingerprint=None)
    for c in loaded.trainable:
        for path, factors in loaded.trainable[c].items():
            for name, x in factors.items():
                np.testing.assert_allclose(
                    np.asarray(x), np.asarray(again.trainable[c][path][name]), atol=1e-6
                )


@pytest.mark.parametrize("case", ["not_an_image", "corrupt", "tiny", "huge"])
def test_bad_photos_fail_before_any_weights_load(case, tmp_path, face_png):
    config = load_config("personalize")
    config.bundle = os.fspath(tmp_path / "no_bundle_here")  # would fail later: the photo must fail first
    config.compile_cache = ""
    path = tmp_path / "photo.png"
    if case == "not_an_image":
        path.write_text("this is a text file, not a photo")
    elif case == "corrupt":
        path.write_bytes(face_png.read_bytes()[:200])
    elif case == "tiny":
        Image.new("RGB", (8, 8), "white").save(path)
    else:
        Image.new("RGB", (300, 300), "white").save(path)
        config.max_image_pixels = 200 * 200
    with pytest.raises(folder.BadImageError) as err:
        personalize.personalize(config, os.fspath(path), os.fspath(tmp_path / "out"))
    assert str(path) in str(err.value)
    expected = {
        "not_an_image": folder.NOT_AN_IMAGE,
        "corrupt": (folder.CORRUPT, folder.TRUNCATED),
        "tiny": folder.TOO_SMALL,
        "huge": folder.TOO_LARGE,
    }[case]
    assert err.value.reason in (expected if isinstance(expected, tuple) else (expected,))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.relax.variant=bogus", "error: config.relax.variant='bogus': choose from ('fresh', 'svd')"),
        ("--config.relax.rank=0", "error: config.relax.rank=0: expected an integer >= 1"),
        ("--config.relax.stepz=3", 'error: bad flag: \'stepz\'; Did you mean "steps" instead of "stepz"?'),
    ],
)
def test_cli_bad_config_value_is_one_error_line_and_exit_2(override, message, face_png, tmp_path):
    """A bad value or a typo: one ``error:`` line naming the field, exit code 2, nothing written."""
    cmd = [sys.executable, "-m", "hdb_jax.personalize", "--config", "configs/personalize.py", override]
    cmd += [f"--image={face_png}", f"--out={tmp_path / 'out'}"]
    env = {k: v for k, v in os.environ.items() if k != "HDB_DEBUG"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_missing_bundle_is_named(tmp_path, face_png):
    config = load_config("personalize")
    config.bundle = os.fspath(tmp_path / "nowhere")
    config.compile_cache = ""
    with pytest.raises(bundle_lib.BundleError, match="nowhere"):
        personalize.personalize(config, os.fspath(face_png), os.fspath(tmp_path / "out"))


@pytest.mark.optimized  # 27 finetune steps: at -O0 they take longer than the compile saves
def test_batched_personalisation_equals_single_runs_and_compiles_once(toy, bundle_dir):
    sd, params = toy
    config = load_config("personalize")
    config.bundle, config.relax.steps, config.relax.batch_size = os.fspath(bundle_dir), 3, 2
    config.compile_cache = ""  # no files outside the test's own
    p = personalize.Personalizer.load(config, sd=sd, params=params)
    ids = [3_000_200, 3_000_201, 3_000_202]
    refs = synthetic.render_batch(ids, [0] * 3, ["photo"] * 3, 0, 32)
    keys = [jax.random.PRNGKey(i) for i in range(3)]
    half = sum(x.nbytes for x in jax.tree_util.tree_leaves(p.bundle.params)) // 2
    with captured_constants_fail_above(half):  # the hypernetwork's weights are an argument
        predicted = [p.predict(r) for r in refs]
    many = p.finetune_many(predicted, refs, jax.numpy.stack(keys))
    assert len(p._run) == 1  # one program for the three photos
    again = p.finetune_many(predicted[::-1], refs[::-1], jax.numpy.stack(keys[::-1]))
    assert len(p._run) == 1  # reused, not recompiled, for new values of the same shape
    for i, (pred, ref, key) in enumerate(zip(predicted, refs, keys)):
        _, tree, losses = p.finetune_from(pred, ref, key)
        for x, y, z in zip(
            jax.tree_util.tree_leaves(many[i][1]),
            jax.tree_util.tree_leaves(tree),
            jax.tree_util.tree_leaves(again[2 - i][1]),
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
        np.testing.assert_allclose(many[i][2], losses, atol=1e-5)
    deltas = [np.asarray(many[i][1]["unet"][next(iter(many[i][1]["unet"]))]["up"]) for i in range(3)]
    assert np.abs(deltas[0] - deltas[1]).max() > 1e-6  # each photo got its own model
