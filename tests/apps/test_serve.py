"""The ``serve`` program's flags: bad ones stop it with one clear line, before anything is loaded. (The server
itself is tested through real processes in tests/server/.)"""

import pytest

from llama_gen.apps import cli


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--port", "-1", "--port must be an integer >= 0 and <= 65535"),
        ("--max_queue", "0", "--max_queue must be an integer >= 1"),
        ("--drain_timeout", "soon", "--drain_timeout must be a number of seconds"),
        ("--log_level", "loud", "--log_level must be one of"),
        ("--top_p", "2", "--top_p must be in (0, 1]"),
    ],
)
def test_bad_flags_stop_before_loading_anything(capsys, flag, value, words):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", flag, value])
    assert e.value.code == 2 and words in capsys.readouterr().err
