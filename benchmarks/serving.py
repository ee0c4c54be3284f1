"""Serving-engine benchmarks on the default model (llama_gen.serve), each contender in the same run.

    python benchmarks/serving.py chat      # time to first token at each turn of a long chat: prefix reuse vs none
    python benchmarks/serving.py streams   # N concurrent greedy streams: equal to their solo outputs, aggregate tok/s
    python benchmarks/serving.py memory    # resident memory over many requests after warm-up

Add --compile for the compiled decode step (built ahead of time on CPU, cached). Results are printed as markdown.
"""

import argparse
import datetime
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from machine import describe, git_commit, rss_mib  # noqa: E402

from llama_gen import Llama  # noqa: E402
from llama_gen.serve import Engine, on_passing_thread  # noqa: E402
from llama_gen.serve.chat import ChatSession  # noqa: E402

QUESTIONS = [
    "Describe in detail how a bicycle works, covering the frame, the wheels, the brakes and the gears.",
    "Now explain how the chain and the derailleur move the power from the pedals to the rear wheel.",
    "What maintenance does a bicycle need every month, and what tools do I need for it?",
    "How do I fix a flat tyre on the road? Give me every step.",
    "Which kinds of bicycles are there, and which one fits a daily commute in a hilly city?",
    "How should the saddle height and handlebars be set for a comfortable ride?",
    "What should I wear and carry for a long ride in the rain?",
    "Summarize everything we discussed so far in a short list.",
]
PROMPTS = [
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "def quicksort(values):",
    "Once upon a time, in a kingdom by the sea,",
    "The three laws of thermodynamics are",
    "Here is a recipe for a simple tomato soup:",
    "In 1969, the first humans to walk on the Moon",
    "A good night's sleep matters because",
]


def build(args) -> Llama:
    """Loads on a passing thread, as the programs do (llama_gen.serve.threads says why)."""
    return on_passing_thread(
        Llama.build, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size, device="cpu",
        dtype="float32", compile=args.compile,
    )  # fmt: skip


def chat_turns(session: ChatSession) -> list[tuple[int, int, float]]:
    """Runs the conversation; returns (turn, prompt tokens, seconds to the first reply text) per turn."""
    rows = []
    for turn, question in enumerate(QUESTIONS, start=1):
        n_prompt = session.fit(question)[1]
        start = time.perf_counter()
        stream = session.send(question)
        next(stream)
        ttft = time.perf_counter() - start
        for _ in stream:
            pass
        rows.append((turn, n_prompt, ttft))
    return rows


def bench_chat(args) -> None:
    llama = build(args)
    with Engine(llama, prefill_chunk=args.prefill_chunk) as engine:
        engine.submit_text("warm up", temperature=0, max_gen_len=4).result()
        reused = chat_turns(ChatSession(llama, args.max_gen_len, engine=engine, temperature=0))
        # the same conversation (same replies: greedy) with the rows emptied before every turn: all re-prefilled
        session = ChatSession(llama, args.max_gen_len, engine=engine, temperature=0)
        cold = []
        for turn, question in enumerate(QUESTIONS, start=1):
            for slot in engine.slots.slots:
                slot.held = []
            n_prompt = session.fit(question)[1]
            start = time.perf_counter()
            stream = session.send(question)
            next(stream)
            cold.append((turn, n_prompt, time.perf_counter() - start))
            for _ in stream:
                pass
    print(header(args))
    print("| turn | prompt tokens | TTFT, prefix reuse (s) | TTFT, whole history prefilled (s) | ratio |")
    print("|---|---|---|---|---|")
    for (turn, n, warm), (_, n_cold, full) in zip(reused, cold):
        print(f"| {turn} | {n} / {n_cold} | {warm:.3f} | {full:.3f} | {warm / full:.2f} |")


def bench_streams(args) -> None:
    llama = build(args)
    with Engine(llama, prefill_chunk=args.prefill_chunk) as engine:
        engine.submit_text("warm up", temperature=0, max_gen_len=4).result()
        solo, solo_rates = {}, []
        for prompt in PROMPTS[: args.clients]:
            done = engine.submit_text(prompt, temperature=0, max_gen_len=args.max_gen_len).result()
            solo[prompt] = done.tokens
            solo_rates.append(done.completion_tokens / (done.timings.finished - done.timings.submitted))
        outputs, start = {}, time.perf_counter()

        def client(prompt: str) -> None:
            handle = engine.submit_text(prompt, temperature=0, max_gen_len=args.max_gen_len)
            for _ in handle:
                pass
            outputs[prompt] = handle.result().tokens

        threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS[: args.clients]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    equal = sum(outputs[p] == solo[p] for p in solo)
    total = sum(len(t) for t in outputs.values())
    one = statistics.median(solo_rates)
    print(header(args))
    print(f"{args.clients} concurrent greedy streams of {args.max_gen_len} tokens: {equal}/{len(solo)} equal to solo;")
    print(f"aggregate {total / elapsed:.1f} tok/s vs one stream alone {one:.1f} tok/s: {total / elapsed / one:.2f}x")


def bench_memory(args) -> None:
    llama = build(args)
    with Engine(llama, prefill_chunk=args.prefill_chunk) as engine:

        def burst(n: int) -> None:
            handles = [
                engine.submit_text(PROMPTS[i % len(PROMPTS)] + " " * (i % 7), max_gen_len=8 + i % 9, seed=i)
                for i in range(n)
            ]
            for h in handles:
                h.result()

        burst(args.warmup)
        rows = []
        for i in range(args.requests // 100):
            burst(100)
            rows.append((100 * (i + 1), rss_mib()))
    print(header(args))
    low, high = min(r for _, r in rows), max(r for _, r in rows)
    print(
        f"resident memory after warm-up ({args.warmup} requests), every 100 requests: "
        f"{', '.join(f'{r:.0f}' for _, r in rows)} MiB; spread {100 * (high - low) / low:.1f} %"
    )


def header(args) -> str:
    return (
        f"\n{describe('cpu')}; commit {git_commit()}; {datetime.date.today()}; max_batch_size {args.max_batch_size}, "
        f"max_seq_len {args.max_seq_len}, {'compiled' if args.compile else 'eager'} decode step\n"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["chat", "streams", "memory"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-gen-len", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"chat": bench_chat, "streams": bench_streams, "memory": bench_memory}[args.what](args)


if __name__ == "__main__":
    main()
