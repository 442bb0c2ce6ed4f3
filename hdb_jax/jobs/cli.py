"""What every command-line entry point shares: user errors end as one ``error:`` line, exit code 2.

A user error is a bad flag or config override, a missing or malformed input file, an
incompatible bundle or weights file, or a training run whose loss became non-finite. Each is
printed as ``error: <message>`` on stderr and the process exits with code 2; anything else is a
bug and keeps its traceback. ``--debug`` (or ``HDB_DEBUG=1`` in the environment) shows the
traceback of user errors too.

  from hdb_jax.jobs import cli
  cli.run(main_function, argv)   # in place of absl.app.run
"""

from __future__ import annotations

import ast
import functools
import os
import sys
from typing import Callable, Sequence

from hdb_jax.adapters import basis, targets
from hdb_jax.blocks.loop import NonFiniteLossError
from hdb_jax.common import tensorfile
from hdb_jax.data import folder, weights
from hdb_jax.formats import personal
from hdb_jax.hypernet import bundle
from hdb_jax.sd import loading
from hdb_jax.sd.model import ConfigError
from hdb_jax.stages.personalize import SettingsError

EXIT_USER_ERROR = 2

# The exceptions whose message is the whole story for a user (each names the file, field or shape).
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    folder.BadImageError,
    folder.NoImagesError,
    bundle.BundleError,
    loading.ModelLoadError,
    ConfigError,
    personal.PersonalWeightsError,
    tensorfile.TensorFileError,
    weights.WeightsDatasetError,
    targets.TargetError,
    basis.BasisError,
    NonFiniteLossError,
    SettingsError,
)


def debugging(argv: Sequence[str] | None = None) -> bool:
    """Whether tracebacks are wanted: ``--debug`` among the arguments or ``HDB_DEBUG`` set."""
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("HDB_DEBUG", "") not in ("", "0")


def fail(message: object) -> None:
    """Prints ``error: message`` on stderr and exits with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _message(err: BaseException) -> str:
    """The first text in the exception's chain without a pasted traceback, on one line.

    Flag parsers wrap the error of a config file (with its traceback) in their own; ml_collections
    quotes its KeyError messages.
    """
    chain = [err]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(inner)
    text = next((str(e) for e in chain if "Traceback" not in str(e)), str(chain[-1]))
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _parse_flags(argv: list[str], configs: Sequence[object] = ()) -> list[str]:
    from absl import flags

    debug = debugging(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        rest = flags.FLAGS(argv)
        for holder in configs:  # ml_collections loads a config file lazily: load it here
            holder.value.keys()  # a config that failed to load raises here
        return rest
    # An unknown flag or bad value (flags.Error); a typo in --config.x=... (AttributeError or
    # KeyError from ml_collections); a config file or knob that does not load (ValueError, OSError).
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as err:
        if debug:
            raise
        fail(f"bad flag: {_message(err)} (--helpfull lists every flag)")
        raise  # unreachable: fail exits


def run(
    main: Callable[[list[str]], object], argv: Sequence[str] | None = None, configs: Sequence[object] = ()
) -> None:
    """``absl.app.run(main)`` where flag and user errors are one ``error:`` line and exit code 2.

    Args:
      configs: the ``config_flags`` holders to load while flags are parsed (a config file that
        does not exist or does not load is then a flag error, not a traceback in ``main``).
    """
    from absl import app

    debug = debugging(argv)

    def guarded(args: list[str]) -> object:
        try:
            return main(args)
        except USER_ERRORS as err:
            if debug:
                raise
            fail(err)

    app.run(
        guarded,
        argv=None if argv is None else list(argv),
        flags_parser=functools.partial(_parse_flags, configs=configs),
    )
