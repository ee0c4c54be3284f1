"""README.md's Python blocks run as pasted, on the default model, and print what their comments show.

A ``# ...`` comment right after a line that prints is the output shown for it: the printed text must match it, with
``...`` standing for any text (how a README abbreviates, and how outputs that sample are checked loosely).
"""

import contextlib
import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from programs import ENV

pytestmark = pytest.mark.real_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """Returns the contents of the README's ```python blocks."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def shown_outputs(block: str) -> list[str]:
    """Returns the outputs the block shows: the ``# `` comment lines that directly follow a print(...) line."""
    shown, after_print = [], False
    for line in block.splitlines():
        stripped = line.strip()
        if after_print and stripped.startswith("# "):
            shown.append(stripped[2:])
            continue
        after_print = stripped.startswith("print(") or bool(re.match(r"\w[\w, ]* = .*print\(", stripped))
    return shown


def pattern(shown: str) -> re.Pattern:
    """Returns the regex a shown output stands for: literal text, with ``...`` matching anything."""
    return re.compile(".*?".join(re.escape(part) for part in shown.split("...")), flags=re.S)


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks_that_show_outputs():
    assert len(BLOCKS) >= 2 and shown_outputs(BLOCKS[0])


SERVER = "http://127.0.0.1:8000"  # where the README's client examples find `python scripts/serve.py`


@contextlib.contextmanager
def readme_server(block: str):
    """Runs the server the block talks to (the README's command, eager, a short window) while the block runs."""
    if SERVER not in block:
        yield
        return
    flags = ["--compile", "False", "--max_seq_len", "512", "--max_batch_size", "2", "--log_level", "warning"]
    server = subprocess.Popen([sys.executable, "scripts/serve.py", *flags], cwd=REPO, env=ENV)
    try:
        deadline = time.monotonic() + 180
        while not healthy():
            assert server.poll() is None and time.monotonic() < deadline, "the README's server did not start"
            time.sleep(0.2)
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0


def healthy() -> bool:
    try:
        return httpx.get(SERVER + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_and_prints_what_it_shows(index):
    block = BLOCKS[index]
    out = io.StringIO()
    with readme_server(block), contextlib.redirect_stdout(out):
        exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    printed, position = out.getvalue(), 0
    for shown in shown_outputs(block):
        found = pattern(shown).search(printed, position)
        assert found, f"block {index} should print {shown!r}; it printed:\n{printed}"
        position = found.end()
