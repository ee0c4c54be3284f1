"""The ``llama-gen`` dispatcher, the ``convert`` command and friendly errors."""

import pytest

from llama_gen.apps import cli
from llama_gen.apps.errors import friendly_errors


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_loads(name):
    assert callable(cli.load_command(name))


def test_usage_and_unknown_command(capsys):
    cli.main([])
    assert "llama-gen chat" in capsys.readouterr().out
    cli.main(["--help"])
    assert "COMMAND --help" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


def test_convert_needs_both_paths(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "some.gguf"])
    assert e.value.code == 2 and "usage: llama-gen convert SRC OUT_DIR" in capsys.readouterr().err


@friendly_errors
def fails(error: Exception) -> None:
    raise error


def test_friendly_errors(capsys, monkeypatch):
    monkeypatch.delenv("LLAMA_GEN_TRACEBACK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        fails(FileNotFoundError("no such checkpoint"))
    assert e.value.code == 2 and capsys.readouterr().err == "error: no such checkpoint\n"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        fails(ValueError("bad flag"))
    assert capsys.readouterr().err == "[rank 1] error: bad flag\n"
    with pytest.raises(RuntimeError):  # not the user's fault: the traceback stays
        fails(RuntimeError("bug"))
    monkeypatch.setenv("LLAMA_GEN_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad flag"):
        fails(ValueError("bad flag"))
