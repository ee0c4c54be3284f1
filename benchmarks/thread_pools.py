"""Why the programs load their model on a passing thread: the engine's step with and without a leftover OpenMP pool.

    python benchmarks/thread_pools.py [--rounds 3]

Runs itself twice in fresh processes: the default model (float32, compiled step, batch 8) is loaded on the main
thread, or on a thread that then ends (llama_gen.serve.threads.on_passing_thread); either way the decode step
is then timed on a long-lived second thread, as the serving engine runs it. GNU libgomp keeps a pool of worker
threads for every thread that ran a parallel region and throttles their spinning once the process holds more
OpenMP threads than CPUs (see llama_gen/serve/threads.py).
"""

import argparse
import os
import queue
import subprocess
import sys
import threading
import time

import torch

from llama_gen import Llama
from llama_gen.fast.step import attention_window
from llama_gen.serve.threads import on_passing_thread


def child(load_on: str, rounds: int) -> None:
    args = {"max_seq_len": 1024, "max_batch_size": 8, "dtype": "float32", "compile": True}
    llama = on_passing_thread(Llama.build, **args) if load_on == "passing" else Llama.build(**args)
    tokens, positions = torch.randint(0, 1000, (8, 1)), torch.full((8,), 200)
    window = attention_window(200, 1024)

    def bench() -> float:
        for _ in range(3):
            llama.forward.decode_rows(tokens, positions, window)
        start = time.perf_counter()
        for _ in range(60):
            llama.forward.decode_rows(tokens, positions, window)
        return (time.perf_counter() - start) / 60 * 1e3

    asks, answers = queue.Queue(), queue.Queue()
    engine_like = threading.Thread(target=lambda: [answers.put(bench()) for _ in iter(asks.get, None)])
    engine_like.start()
    for _ in range(rounds):
        asks.put(1)
        print(f"model loaded on the {load_on} thread: step on the engine-like thread {answers.get():.1f} ms")
    asks.put(None)
    engine_like.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=["main", "passing"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for load_on in ("main", "passing"):
        cmd = [sys.executable, __file__, "--child", load_on, "--rounds", str(args.rounds)]
        subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
