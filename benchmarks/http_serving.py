"""The HTTP server under load: aggregate tokens/s and time to first token against concurrent streaming clients, and
the server's resident memory over clients that disconnect mid-stream.

    python benchmarks/http_serving.py                       # default model, compiled step, 1/4/8/16 clients
    python benchmarks/http_serving.py --clients 1,2 --max-tokens 8 --rounds 1 --disconnects 10 --no-compile  # smoke

The server is ``scripts/serve.py`` in a child process (its own threads: --threads), the clients are httpx streams
in this process. Each round at N clients starts N greedy chat streams at once (different questions, max_tokens
each); a client's time to first token runs from sending its request to its first content chunk; aggregate tokens/s
is every client's completion tokens over the round's wall time. Writes a JSON report and a plot (both against the
number of clients) and prints a markdown table.
"""

import argparse
import asyncio
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from machine import describe, git_commit  # noqa: E402

QUESTIONS = [
    "Describe how a bicycle works.",
    "Explain photosynthesis to a child.",
    "Write a short poem about the sea.",
    "What are the benefits of regular exercise?",
    "How does a refrigerator keep food cold?",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of a classic fairy tale.",
    "What should I pack for a weekend hike?",
    "How do vaccines work?",
    "Explain what an algorithm is.",
    "What makes a good cup of coffee?",
    "Describe the water cycle.",
    "How do airplanes stay in the air?",
    "What is the difference between weather and climate?",
    "Give me a recipe for pancakes.",
]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    """Starts scripts/serve.py on a free port; returns (process, base url, model name) once /health answers."""
    cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", "0", "--log_level", "warning"]
    cmd += ["--max_batch_size", str(args.max_batch_size), "--max_seq_len", str(args.max_seq_len)]
    cmd += ["--device", "cpu", "--dtype", "float32", "--compile", str(args.compile)] + args.server_args.split()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + args.start_timeout
    while (match := re.search(r"serving (\S+) at (http://\S+)/v1 ", log_path.read_text(errors="replace"))) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    url = match.group(2)
    while httpx.get(url + "/health").status_code != 200:
        time.sleep(0.1)
    return proc, url, match.group(1)


async def one_stream(http: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> tuple[float, int]:
    """Streams one greedy chat reply; returns (seconds to the first content chunk, completion tokens)."""
    body = {
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def load_round(url: str, model: str, clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    """N clients at once; returns (wall seconds, each client's TTFT, completion tokens in all)."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(http, model, QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(clients))
        )
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


async def disconnecting(url: str, model: str, n: int, wave: int) -> None:
    """n clients in waves of `wave`, each leaving after its first content chunk."""

    async def leave(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": 256, "stream": True, "seed": i}  # fmt: skip
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and any(
                    c["delta"].get("content") for c in json.loads(line[6:])["choices"]
                ):
                    break

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=wave + 8)) as http:
        for start in range(0, n, wave):
            await asyncio.gather(*(leave(http, i) for i in range(start, min(n, start + wave))))


def wait_idle(url: str) -> None:
    while (health := httpx.get(url + "/health").json())["active_slots"] or health["queue_depth"]:
        time.sleep(0.05)


def measure_rss(url: str, model: str, proc: subprocess.Popen, args) -> list[tuple[int, float]]:
    """Server RSS (MiB) after warm-up and after every wave of disconnecting clients: [(clients so far, MiB)]."""
    server = psutil.Process(proc.pid)
    asyncio.run(disconnecting(url, model, args.wave, args.wave))  # warm-up
    wait_idle(url)
    rows = [(0, server.memory_info().rss / 2**20)]
    for done in range(args.wave, args.disconnects + 1, args.wave):
        asyncio.run(disconnecting(url, model, args.wave, args.wave))
        wait_idle(url)
        rows.append((done, server.memory_info().rss / 2**20))
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["load"]
    n = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["tokens_per_s"] for r in rows], "o-")
    left.set(xlabel="concurrent streaming clients", ylabel="aggregate tokens/s", title="Throughput", xticks=n)
    right.plot(n, [r["ttft_p50_s"] for r in rows], "o-", label="p50")
    right.plot(n, [r["ttft_p99_s"] for r in rows], "s--", label="p99")
    right.set(xlabel="concurrent streaming clients", ylabel="seconds", title="Time to first token", xticks=n)
    right.legend()
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    fig.suptitle(f"{report['model']} over HTTP ({report['step']} decode step), {report['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> dict:
    log_path = Path(tempfile.mkdtemp(prefix="http_serving.")) / "server.log"
    proc, url, model = start_server(args, log_path)
    try:
        asyncio.run(load_round(url, model, 1, 8))  # warm-up (and the compiled step's first call)
        load = []
        for clients in args.clients:
            walls, ttfts, tokens = [], [], 0
            for _ in range(args.rounds):
                wall, round_ttfts, round_tokens = asyncio.run(load_round(url, model, clients, args.max_tokens))
                walls.append(wall)
                ttfts += round_ttfts
                tokens += round_tokens
            load.append({
                "clients": clients, "tokens_per_s": tokens / sum(walls), "ttft_p50_s": statistics.median(ttfts),
                "ttft_p99_s": percentile(ttfts, 99), "completion_tokens": tokens, "rounds": args.rounds,
            })  # fmt: skip
            print(f"{clients} clients: {load[-1]['tokens_per_s']:.1f} tok/s, TTFT p50 {load[-1]['ttft_p50_s']:.3f} s")
        rss = measure_rss(url, model, proc, args) if args.disconnects else []
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(120)
    return {
        "model": model, "machine": f"{describe('cpu')}, server OMP_NUM_THREADS={args.threads}",
        "commit": git_commit(), "date": str(datetime.date.today()), "step": "compiled" if args.compile else "eager",
        "max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len, "max_tokens": args.max_tokens,
        "threads": args.threads, "load": load, "rss_mib": rss, "server_exit_status": status,
    }  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        f"{report['machine']}; commit {report['commit']}; {report['date']}; {report['model']}, {report['step']} "
        f"decode step, max_batch_size {report['max_batch_size']}, greedy chat streams of {report['max_tokens']} "
        "tokens",
        "",
        "| clients | aggregate tok/s | TTFT p50 (s) | TTFT p99 (s) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} |"
        for r in report["load"]
    ]
    if report["rss_mib"]:
        mib = [m for _, m in report["rss_mib"]]
        lines.append(
            f"\nServer RSS over {report['rss_mib'][-1][0]} clients disconnecting mid-stream (after a warm-up wave): "
            f"{', '.join(f'{m:.0f}' for m in mib)} MiB; spread {100 * (max(mib) - min(mib)) / min(mib):.1f} %"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="rounds per number of clients (TTFT percentiles pool them)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="the server's OMP_NUM_THREADS")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="the eager decode step")
    p.add_argument(
        "--disconnects", type=int, default=100, help="clients leaving mid-stream for the RSS series (0: none)"
    )
    p.add_argument("--wave", type=int, default=10, help="disconnecting clients at once")
    p.add_argument("--server-args", default="", help="more flags for scripts/serve.py, e.g. '--ckpt_dir DIR'")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for the server (compiling)")
    p.add_argument("--json", type=Path, default=HERE / "http_serving.json")
    p.add_argument("--plot", type=Path, default=HERE / "http_serving.png")
    args = p.parse_args(argv)
    report = run(args)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(markdown(report))
    print(f"\nwrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
