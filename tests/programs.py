"""Running the programs as their users do: a script in a fresh process, or several under torchrun, from the
repository root, with one torch thread each (several processes share the machine's cores)."""

import os
import socket
import subprocess
import sys

from conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """Returns a TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*args: object, input: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs ``python ARGS...`` (a script and its flags) to its end; returns its exit status and output (text)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], input=input, capture_output=True, text=True, cwd=REPO, env=ENV,
        timeout=timeout,
    )  # fmt: skip


def torchrun(nproc: int, *args: object, input: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs a script and its flags under ``torchrun --nproc_per_node nproc`` (on a free port) to its end."""
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_port", free_port())
    return run_script(*launcher, *args, input=input, timeout=timeout)
