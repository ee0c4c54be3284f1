"""A real server for the tests: ``scripts/serve.py`` in a child process on a free port, talked to over HTTP."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"serving (\S+) at (http://\S+)/v1 ")


class LiveServer:
    """``python [LAUNCHER] scripts/serve.py ARGS --port 0`` (launcher: e.g. torchrun's module and flags) with its
    output in log_path; ``url`` once it answers /health."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict | None = None, timeout: float = 120, launcher: tuple = ()
    ):
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        # (--compile False: no compiled step built in the background while the tests run)
        cmd = [
            sys.executable,
            *launcher,
            str(REPO / "scripts" / "serve.py"),
            "--compile",
            "False",
            *args,
            "--port",
            "0",
        ]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.model, self.url = self._wait_for_line(timeout)
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def _wait_for_line(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while (match := READY.search(self.log())) is None:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"the server did not start in {timeout} s:\n{self.log()}"
            time.sleep(0.05)
        return match.group(1), match.group(2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """Sends SIGTERM; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def tiny_server_args(ckpt: Path, tokenizer: Path, *more: str) -> list[str]:
    """The flags of a server on a tiny random model (fp32 on the CPU)."""
    return [
        "--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer), "--model_name", "tiny", "--device", "cpu",
        "--dtype", "float32", "--log_level", "warning", *more,
    ]  # fmt: skip
