"""The server under torchrun with model parallel: rank 0 serves HTTP and schedules, the other rank follows."""

import functools
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import LLAMA2_TOKENIZER
from live_server import LiveServer, tiny_server_args
from programs import free_port


@pytest.mark.multiprocess
def test_model_parallel_server_answers_as_one_process(tiny_checkpoints, tmp_path):
    # torchrun, 2 ranks: rank 0 serves HTTP and runs the engine, rank 1 makes the same model calls.
    _, ckpt = tiny_checkpoints["mha"]  # 4 heads: splits over 2 ranks
    args = tiny_server_args(ckpt, LLAMA2_TOKENIZER, "--max_seq_len", "96", "--max_batch_size", "4")
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    answers = []
    for where, how in (("one", ()), ("two", launcher)):
        live = LiveServer(args, tmp_path / f"{where}.txt", launcher=how)
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
        complete = functools.partial(client.completions.create, model="tiny", temperature=0, max_tokens=12)
        with ThreadPoolExecutor(3) as pool:  # together: they share the engine's steps
            replies = pool.map(lambda p, complete=complete: complete(prompt=p), prompts)
            answers.append([r.choices[0].text for r in replies])
        if how:  # torchrun exits non-zero on a signal of its own: stop the server (rank 0), the follower goes too
            os.kill(rank_zero(live.proc.pid), signal.SIGTERM)
            assert live.proc.wait(60) == 0, live.log()
        assert live.stop() == 0, live.log()
    assert answers[1] == answers[0] and all(answers[0])


def rank_zero(launcher_pid: int) -> int:
    """Returns the pid of torchrun's worker of rank 0 (by the RANK in its environment)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # (a process that ended meanwhile)
        if ppid == launcher_pid and b"RANK=0" in environ:
            return int(stat.parent.name)
    raise AssertionError(f"torchrun {launcher_pid} has no rank-0 worker")
