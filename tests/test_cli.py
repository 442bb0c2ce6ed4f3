"""The shared command-line guard: user errors are one ``error:`` line and exit code 2."""

import pytest

from hdb_jax.blocks.loop import NonFiniteLossError
from hdb_jax.hypernet.bundle import BundleError
from hdb_jax.jobs import cli


def _run(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run(main, argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "err",
    [BundleError("runs/x/hypernet: no hypernet.safetensors"), NonFiniteLossError("loss nan at step 7")],
)
def test_user_error_is_one_line_and_exit_2(err, capsys, monkeypatch):
    monkeypatch.delenv("HDB_DEBUG", raising=False)

    def main(_):
        raise err

    code, stderr = _run(main, ["prog"], capsys)
    assert code == cli.EXIT_USER_ERROR == 2
    assert stderr == f"error: {err}\n"


def test_debug_keeps_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("HDB_DEBUG", raising=False)

    def main(_):
        raise BundleError("bad bundle")

    with pytest.raises(BundleError, match="bad bundle"):
        cli.run(main, ["prog", "--debug"])
    monkeypatch.setenv("HDB_DEBUG", "1")
    with pytest.raises(BundleError, match="bad bundle"):
        cli.run(main, ["prog"])


def test_bugs_are_not_user_errors(monkeypatch):
    monkeypatch.delenv("HDB_DEBUG", raising=False)

    def main(_):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run(main, ["prog"])


def test_unknown_flag_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HDB_DEBUG", raising=False)
    code, stderr = _run(lambda _: None, ["prog", "--no_such_flag=1"], capsys)
    assert code == 2
    assert stderr.startswith("error: ") and "no_such_flag" in stderr and stderr.count("\n") == 1
