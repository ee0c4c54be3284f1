"""The server program: its flags, the API key flag, and SIGTERM (requests in flight finish or are cancelled by the
deadline, new connections are refused, the process exits 0)."""

import json
import threading
import time

import httpx
import pytest
from conftest import LLAMA2_TOKENIZER
from live_server import LiveServer, tiny_server_args

from llama_gen.apps import cli


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--port", "-1", "--port must be an integer >= 0 and <= 65535"),
        ("--max_queue", "0", "--max_queue must be an integer >= 1"),
        ("--drain_timeout", "soon", "--drain_timeout must be a number of seconds"),
        ("--top_p", "2", "--top_p must be in (0, 1]"),
    ],
)
def test_bad_flags_stop_before_loading_anything(capsys, flag, value, words):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", flag, value])
    assert e.value.code == 2 and words in capsys.readouterr().err


def stream_lines(url: str, body: dict, lines: list[str], started: threading.Event) -> None:
    """Reads one streamed completion into lines (an error ends with its repr)."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except httpx.HTTPError as error:
        lines.append(repr(error))
    started.set()


def test_sigterm_finishes_short_requests_cancels_long_ones_at_the_deadline_and_exits_0(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    args = tiny_server_args(ckpt, LLAMA2_TOKENIZER, "--max_seq_len", "4096", "--max_batch_size", "2")
    server = LiveServer([*args, "--drain_timeout", "1.5", "--api_key", "k"], tmp_path / "log.txt")
    base = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "stream": True}
    short, long = [], []
    started = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=stream_lines, args=(server.url, {**base, "max_tokens": 3000}, long, started[0])),
        threading.Thread(target=stream_lines, args=(server.url, {**base, "max_tokens": 10}, short, started[1])),
    ]
    threads[0].start()
    assert started[0].wait(30)
    threads[1].start()
    assert started[1].wait(30)
    start = time.monotonic()
    server.proc.send_signal(15)
    with pytest.raises(httpx.ConnectError):  # no new connections once it drains
        time.sleep(0.3)
        httpx.get(server.url + "/health")
    assert server.proc.wait(30) == 0, server.log()
    assert time.monotonic() - start < 1.5 + 3.0, server.log()
    for t in threads:
        t.join(10)
    assert short[-1] == "data: [DONE]" and json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert long[-1] == "data: [DONE]", long[-3:]  # cut at the deadline, but as a well-formed stream
    assert "shut down before the answer was complete" in json.loads(long[-2][6:])["error"]["message"]
