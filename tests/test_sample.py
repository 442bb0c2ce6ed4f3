"""The compiled sampler against step-by-step references, PyTorch diffusers, and the CLI.

Every test uses the tiny model with 2-3 steps; ``make_sampler`` caches its jitted functions,
so the tests share a handful of compiled programs (the UNet is compiled 6 times in all).
"""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hdb_jax import adapters as A
from hdb_jax.blocks import sample as S
from hdb_jax.common import images as images_lib
from hdb_jax.jobs import sample as sample_cli

STEPS = 2
G = 3.0  # guidance scale of the shared samplers
PROMPTS = ["a photo of sks face", "a painting of a face", "a dog"]


@pytest.fixture(scope="module")
def ids(tiny_sd):
    """(cond [3, 77], uncond [3, 77]) token ids."""
    cond = tiny_sd.tokenize(PROMPTS)
    return cond, np.broadcast_to(tiny_sd.tokenize([""]), cond.shape)


@pytest.fixture(scope="module")
def ref_predict(tiny_sd):
    return jax.jit(tiny_sd.predict)


@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory):
    """Starts ``python -m hdb_jax.sample`` (2 prompts x 2 seeds, 2 steps) when the module starts,
    so its imports and compiles overlap the other tests; ``test_cli_...`` checks the result."""
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "samples"
    cmd = [
        sys.executable,
        "-m",
        "hdb_jax.sample",
        "--model",
        "tiny",
        "--prompt",
        "a photo of sks face",
        "--prompt",
        "a dog",
        "--seeds",
        "0,1",
        "--scheduler",
        "dpm++",
        "--steps",
        "2",
        "--guidance",
        "3",
        "--out",
        str(out),
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    with open(tmp / "log.txt", "w") as log:  # a file, not a pipe: nothing can block on it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    yield proc, out
    if proc.poll() is None:  # the CLI test was deselected or failed early
        proc.kill()
        proc.wait()


def reference_loop(sd, params, predict, cond_ids, uncond_ids, latents, scheduler, steps, guidance):
    """Python loop: separate jitted UNet calls, our own CFG, one eager scheduler ``step`` per step.

    With ``guidance == 1`` only the conditional prediction is computed.
    """
    sched = S.make_scheduler(sd, scheduler)
    state = sched.set_timesteps(sched.create_state(), steps, latents.shape)
    cond = sd.encode_text(params["text_encoder"], cond_ids)
    uncond = sd.encode_text(params["text_encoder"], uncond_ids)
    x = latents
    for t in np.asarray(state.timesteps):
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        eps = predict(params["unet"], x, tb, cond)
        if guidance != 1.0:
            eps_u = predict(params["unet"], x, tb, uncond)
            eps = eps_u + guidance * (eps - eps_u)
        x, state = sched.step(state, eps, int(t), x, return_dict=False)
    return np.asarray(x)


def assert_close_to_float32_noise(ours, ref, tol=1e-5):
    """|ours - ref| <= tol · max|ref|: the UNet runs in different XLA programs on each side, and
    the random tiny UNet with guidance inflates latents to O(10-50), so only a relative bound
    means the same thing for every case (float32 is ~6e-8)."""
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, atol=tol * scale, rtol=0)


def _fake_unet(x, t, xp):
    """A deterministic stand-in for the UNet, written for numpy-like ``xp`` (jnp or torch)."""
    t = t * 1.0  # near the identity, so latents stay O(1) and float32 error stays ~1e-6
    return 0.95 * x + 0.1 * xp.tanh(3 * x) * xp.cos(t / 200.0) + 0.02 * xp.sin(t / 100.0)


X0 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 4, 8, 8)), np.float32)


# -------------------------------------------------------------------- loop vs step-by-step
@pytest.mark.parametrize("scheduler,steps", [("ddim", 4), ("dpm++", 4), ("dpm++", 16)])
def test_fori_loop_equals_eager_steps(tiny_sd, scheduler, steps):
    """The compiled loop over a fake UNet equals the Flax scheduler stepped eagerly, <=1e-5."""
    sched = S.make_scheduler(tiny_sd, scheduler)
    ours = jax.jit(lambda x: S.denoise(sched, steps, lambda z, t: _fake_unet(z, t, jnp), x))(X0)
    state = sched.set_timesteps(sched.create_state(), steps, X0.shape)
    x = jnp.asarray(X0)
    for t in np.asarray(state.timesteps):
        x, state = sched.step(state, _fake_unet(x, jnp.int32(t), jnp), int(t), x, return_dict=False)
    assert np.abs(np.asarray(x) - X0).max() > 0.1
    np.testing.assert_allclose(np.asarray(ours), np.asarray(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheduler,steps", [("ddim", STEPS), ("dpm++", 3)])
def test_sampler_matches_eager_reference(tiny_sd, tiny_params, ids, ref_predict, scheduler, steps):
    """The full sampler (text encoder, CFG, UNet, loop) against the Python-loop reference."""
    cond, uncond = ids[0][:1], ids[1][:1]
    latents = S.initial_latents(tiny_sd, [5], scheduler=scheduler)  # [1, 4, 16, 16]
    fn = S.make_sampler(tiny_sd, scheduler=scheduler, num_steps=steps, guidance_scale=G, decode=False)
    ours = np.asarray(fn(tiny_params, cond, uncond, latents))
    ref = reference_loop(tiny_sd, tiny_params, ref_predict, cond, uncond, latents, scheduler, steps, G)
    assert np.abs(ref - np.asarray(latents)).max() > 0.1  # the loop did something
    assert_close_to_float32_noise(ours, ref)


def test_guidance_one_is_conditional_only(tiny_sd, tiny_params, ids, ref_predict):
    cond, uncond = ids[0][:1], ids[1][:1]
    latents = S.initial_latents(tiny_sd, [5])
    plain = S.make_sampler(tiny_sd, num_steps=STEPS, guidance_scale=1.0, decode=False)
    ours = np.asarray(plain(tiny_params, cond, uncond, latents))
    ref = reference_loop(tiny_sd, tiny_params, ref_predict, cond, uncond, latents, "ddim", STEPS, 1.0)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # uncond ids are ignored at scale 1; a larger scale moves the result.
    np.testing.assert_array_equal(ours, np.asarray(plain(tiny_params, cond, cond, latents)))
    guided = S.make_sampler(tiny_sd, num_steps=STEPS, guidance_scale=G, decode=False)
    assert np.abs(np.asarray(guided(tiny_params, cond, uncond, latents)) - ours).max() > 1e-2


# -------------------------------------------------------------------- PyTorch diffusers
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_matches_torch_diffusers_scheduler(tiny_sd, scheduler):
    torch = pytest.importorskip("torch")
    import diffusers

    steps = 4
    sched = S.make_scheduler(tiny_sd, scheduler)
    ours = jax.jit(lambda x: S.denoise(sched, steps, lambda z, t: _fake_unet(z, t, jnp), x))(X0)

    config = dict(tiny_sd.configs["scheduler"])
    if scheduler == "ddim":
        ref = diffusers.DDIMScheduler.from_config(config)
    else:  # the Flax solver ends at alpha/sigma of t=0, which torch calls final_sigmas_type="sigma_min"
        ref = diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", final_sigmas_type="sigma_min"
        )
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(S.timesteps(tiny_sd, scheduler, steps), ref.timesteps.numpy())
    x = torch.from_numpy(X0.copy()).double()
    for t in ref.timesteps:
        x = ref.step(_fake_unet(x, t.double(), torch), t, x).prev_sample
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-5, rtol=0)


# -------------------------------------------------------------------- determinism and batching
def test_seeds_determinism_and_batch_independence(tiny_sd, tiny_params, ids):
    cond, uncond = ids
    # Two batch shapes below (3 and 1): two traces at most, however often and with whatever values.
    fn = S.make_sampler(
        tiny_sd, num_steps=STEPS, guidance_scale=G, wrap=functools.partial(chex.assert_max_traces, n=2)
    )
    batch = np.asarray(fn(tiny_params, cond, uncond, S.initial_latents(tiny_sd, [0, 1, 2])))
    assert batch.shape == (3, 32, 32, 3) and -1 <= batch.min() < batch.max() <= 1
    again = np.asarray(fn(tiny_params, cond, uncond, S.initial_latents(tiny_sd, [0, 1, 2])))
    np.testing.assert_array_equal(batch, again)
    other = np.asarray(fn(tiny_params, cond, uncond, S.initial_latents(tiny_sd, [7, 8, 9])))
    assert (np.abs(other - batch).max(axis=(1, 2, 3)) > 0.1).all()
    # The middle pair alone (a batch of 1: another compiled shape) gives the same image.
    alone = np.asarray(fn(tiny_params, cond[1:2], uncond[1:2], S.initial_latents(tiny_sd, [1])))
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5, rtol=0)
    # One compiled program per batch shape: new values of a seen shape do not trace again.
    scaled = jax.tree_util.tree_map(lambda p: p * 1.01, tiny_params)
    fn(scaled, cond[::-1], uncond, S.initial_latents(tiny_sd, [4, 5, 6]))
    with pytest.raises(AssertionError, match="trace"):  # a third shape would be a third trace
        fn(tiny_params, cond[:2], uncond[:2], S.initial_latents(tiny_sd, [1, 2]))


LOOPS = ("while", "scan")  # fori_loop with static bounds lowers to scan


def _primitives(jaxpr, depth=0):
    """(primitive name, number of loops around it) for every equation, recursively."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, depth
        inner_depth = depth + (eqn.primitive.name in LOOPS)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _primitives(sub, inner_depth)


def test_whole_loop_is_one_program(tiny_sd, tiny_params, ids):
    """One while loop with the UNet inside; outside it only the text encoder and the VAE run."""
    fn = S.make_sampler(tiny_sd, num_steps=STEPS, guidance_scale=G)
    cond, uncond = ids
    jaxpr = jax.make_jaxpr(fn)(tiny_params, cond, uncond, S.initial_latents(tiny_sd, [0, 1, 2]))
    prims = list(_primitives(jaxpr.jaxpr))
    assert sum(name in LOOPS and d == 0 for name, d in prims) == 1  # the step loop
    convs_in_loop = [name for name, d in prims if name == "conv_general_dilated" and d == 1]
    convs_outside = [name for name, d in prims if name == "conv_general_dilated" and d == 0]
    assert len(convs_in_loop) > 10 and len(convs_outside) > 10  # UNet inside, VAE decoder outside


def test_sample_pads_batches_and_merged_lora_changes_images(tiny_sd, tiny_params, ids):
    kw = dict(num_steps=STEPS, guidance_scale=G, batch_size=3, progress=False)
    prompts, seeds = PROMPTS + ["a cat"], [0, 1, 2, 3]  # two batches of 3, the last padded
    base = S.sample(tiny_sd, tiny_params, prompts, seeds, **kw)
    assert base.shape == (4, 32, 32, 3) and base.dtype == np.uint8
    assert len({im.tobytes() for im in base}) == 4
    fn = S.make_sampler(tiny_sd, num_steps=STEPS, guidance_scale=G)
    direct = fn(tiny_params, *ids, S.initial_latents(tiny_sd, seeds[:3]))
    np.testing.assert_array_equal(base[:3], images_lib.to_uint8(direct))
    single = S.sample(tiny_sd, tiny_params, prompts[2:3], seeds[2:3], **kw)
    np.testing.assert_array_equal(single[0], base[2])  # padded to the same program

    adapter = A.Adapter.create(A.LoRA(rank=2), tiny_params["unet"], [A.PATTERNS["unet_attention"]], "unet")
    zero = adapter.init(jax.random.PRNGKey(0))  # up = 0: ΔW = 0
    merged = A.merge_all(tiny_params, {"unet": adapter}, {"unet": zero}, {})
    np.testing.assert_array_equal(S.sample(tiny_sd, merged, prompts, seeds, **kw), base)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
    rand = jax.tree_util.tree_map(lambda p: 0.5 * jax.random.normal(next(keys), p.shape), zero)
    merged = A.merge_all(tiny_params, {"unet": adapter}, {"unet": rand}, {})
    assert merged["vae"] is tiny_params["vae"] and merged["unet"] is not tiny_params["unet"]
    personal = S.sample(tiny_sd, merged, prompts, seeds, **kw)
    assert (np.abs(personal.astype(int) - base).max(axis=(1, 2, 3)) > 10).all()


def test_cli_weights_lidb_and_lora(tiny_sd, tiny_params, tmp_path, monkeypatch):
    """--weights/--basis through ``main`` in-process (the tiny model swapped for the fixture)."""
    from hdb_jax.adapters import basis as basis_io
    from hdb_jax.formats import personal
    from hdb_jax.sd.fingerprint import params_fingerprint

    def create(kind, component, pattern):
        return A.Adapter.create(kind, tiny_params[component], [A.PATTERNS[pattern]], component)

    adapters = {
        "unet": create(A.LiDB(a=16, b=8, rank=2), "unet", "unet_attention"),
        "text_encoder": create(A.LoRA(rank=2), "text_encoder", "text_attention"),
    }
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 1000))
    noise = lambda p: 0.3 * jax.random.normal(next(keys), p.shape)  # noqa: E731
    trainable = {c: jax.tree_util.tree_map(noise, a.init(next(keys))) for c, a in adapters.items()}
    bases = adapters["unet"].basis(jax.random.PRNGKey(3))
    basis_file = tmp_path / "basis.safetensors"
    digest = basis_io.save_basis(
        basis_file, {f"unet.{p}": {k: np.asarray(v) for k, v in f.items()} for p, f in bases.items()}
    )
    weights = personal.save_personal(
        tmp_path / "me.safetensors",
        adapters,
        trainable,
        base_fingerprint=params_fingerprint(tiny_params),
        basis_hash=digest,
    )

    monkeypatch.setattr(sample_cli, "load_model", lambda source: (tiny_sd, tiny_params))
    out = tmp_path / "out"
    sample_cli.main(
        [
            "--model",
            "tiny",
            "--prompt",
            PROMPTS[0],
            "--seeds",
            "0,1,2",
            "--steps",
            str(STEPS),
            "--guidance",
            str(G),
            "--batch-size",
            "3",
            "--weights",
            str(weights),
            "--basis",
            str(basis_file),
            "--out",
            str(out),
        ]
    )
    written = np.stack([np.asarray(Image.open(out / f"p0_s{s}.png")) for s in range(3)])

    loaded = personal.load_for_model(weights, tiny_params, basis_file)
    merged = A.merge_all(tiny_params, *loaded)
    direct = A.merge_all(tiny_params, adapters, trainable, {"unet": bases})
    for c in adapters:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), merged[c], direct[c])
    kw = dict(num_steps=STEPS, guidance_scale=G, batch_size=3, progress=False)
    np.testing.assert_array_equal(written, S.sample(tiny_sd, merged, [PROMPTS[0]] * 3, [0, 1, 2], **kw))
    base = S.sample(tiny_sd, tiny_params, [PROMPTS[0]] * 3, [0, 1, 2], **kw)
    assert (np.abs(written.astype(int) - base).max(axis=(1, 2, 3)) > 10).all()

    with pytest.raises(personal.IncompatibleWeightsError):  # another base model
        personal.load_for_model(weights, jax.tree_util.tree_map(lambda p: p + 1.0, tiny_params), basis_file)
    with pytest.raises(personal.PersonalWeightsError, match="--basis"):
        personal.load_for_model(weights, tiny_params)


def test_save_grid_and_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    paths = images_lib.save_images(images, tmp_path / "imgs", [f"im{i}" for i in range(5)])
    np.testing.assert_array_equal(np.asarray(Image.open(paths[3])), images[3])
    grid = np.asarray(Image.open(images_lib.save_grid(images, tmp_path / "grid.png", cols=2)))
    assert grid.shape == (3 * 8, 2 * 6, 3)
    np.testing.assert_array_equal(grid[8:16, 6:12], images[3])  # row-major placement
    labelled = Image.open(images_lib.save_grid(images, tmp_path / "lab.png", labels=list("abcde")))
    assert labelled.size == (3 * 6, 2 * (8 + 14))


# -------------------------------------------------------------------- command line
def test_cli_writes_images_and_grid(cli_run):
    proc, out = cli_run
    returncode = proc.wait(timeout=600)
    assert returncode == 0, (out.parent / "log.txt").read_text()[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "p0_s0.png", "p0_s1.png", "p1_s0.png", "p1_s1.png"]
    assert Image.open(out / "p1_s0.png").size == (32, 32)
    assert Image.open(out / "grid.png").size == (2 * 32, 2 * 32)  # rows: prompts, columns: seeds
