"""Shared fixtures. Eight fake CPU devices are set up before JAX starts, for sharding tests."""

import contextlib
import os
import warnings

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs run a few steps each: XLA:CPU's optimisations cost more compile time than
# they save (six compile-bound files: 397 s -> 308 s). Inherited by the command lines the tests
# start; a test that runs many steps is marked ``optimized`` and compiles with them on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent compilation cache for the whole session, shared with the CLI subprocesses the tests
# start (they inherit the environment): the same tiny-model programs compile once, not once per test.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hdb_jax_test_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# A size limit turns on JAX's cross-process file lock around cache reads and writes (without one,
# two processes that compile the same program at once can write one file together, and a third
# can read it half-written).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd():
    """The tiny SD-family model (32 px images, 16x16 latents)."""
    from hdb_jax.sd import tiny as tiny_lib

    return tiny_lib.tiny()


@pytest.fixture(scope="session")
def tiny_params(tiny_sd):
    return tiny_sd.random_params(jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def unet_inputs(tiny_sd, tiny_params):
    """(latents [2,4,16,16], timesteps [2], context [2,77,32]) for two different prompts."""
    latents = jax.random.normal(jax.random.PRNGKey(1), tiny_sd.latent_shape(32, batch=2))
    ids = tiny_sd.tokenize(["a photo of sks face", "a painting of a face"])
    context = tiny_sd.encode_text(tiny_params["text_encoder"], ids)
    return latents, jnp.array([10, 700], jnp.int32), context


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny diffusers-format model directory written by PyTorch diffusers (safetensors)."""
    pytest.importorskip("torch")
    from test_sd_reference import _write_pytorch_model

    from hdb_jax.sd import tiny as tiny_lib
    from hdb_jax.sd import vocab

    root = tmp_path_factory.mktemp("tiny_pt_model")
    tokenizer = vocab.tiny_tokenizer()
    _write_pytorch_model(root, tiny_lib.tiny_configs(resolution=32, tokenizer=tokenizer), tokenizer)
    return root


def cli_env(devices: int | None = None, **extra: str) -> dict:
    """The environment of a command-line run in a test: ``devices`` fake CPU devices (None: the
    suite's) and ``extra`` variables. It compiles as the suite does, with XLA's most optimisations
    off (``JAX_DISABLE_MOST_OPTIMIZATIONS``, set above and inherited)."""
    flags = (
        os.environ.get("XLA_FLAGS", "")
        if devices is None
        else f"--xla_force_host_platform_device_count={devices}"
    )
    return {**os.environ, "XLA_FLAGS": flags, **extra}


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@contextlib.contextmanager
def captured_constants_fail_above(threshold_bytes: int):
    """Inside: a jit lowering that captures more than ``threshold_bytes`` of constants (arrays it
    closes over rather than takes as arguments) raises JAX's warning as an error."""
    previous = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", int(threshold_bytes))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="A large amount of constants")
            yield
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", previous)


@pytest.fixture(autouse=True)
def _optimized(request):
    """XLA's optimisations on for the tests marked ``optimized`` (off for the rest of the suite)."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def load_config(name: str, arg: str | None = None):
    """``get_config(arg)`` of ``configs/<name>.py`` (the experiment configs are files, not a package)."""
    from hdb_jax.jobs import config_lib

    return config_lib.load(os.path.join(CONFIGS, f"{name}.py"), arg)


# The longest test files, longest first (serial durations on 2 cores). `make test` runs files in
# two processes (`-n 2 --dist loadfile --no-loadscope-reorder`: files go out in collection order,
# not xdist's default of most tests first): starting the long ones first keeps one of them from
# starting last and running alone at the end.
LONGEST_FIRST = (
    "test_demo.py",
    "test_hypernet_sharding.py",
    "test_subject.py",
    "test_hypernet_learns.py",
    "test_personalize.py",
    "test_preopt.py",
    "test_toy_base.py",
    "test_notebook.py",
    "test_baselines.py",
    "test_adapters.py",
    "test_identity_sources.py",
    "test_sweep.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
