"""Batch completion of a mixed prompt file against the full-batch rate, each a whole `complete.py` process.

    python benchmarks/batch_mixed.py [--records 160] [--compile] [--first-run] [--threads 2]

The mixed file (seeded, so every run writes the same one): text prompts of 12-150 words with max_gen_len drawn
from 16-192, and chat questions whose answers end on their own (max_gen_len 192). The full-batch file: 8 equal
text prompts decoded together for 192 tokens, with the same flags. Rate = completion tokens / process wall time;
"after load" also subtracts the time of a process that completes one record with max_gen_len 2 (start-up, model
load, compiled step load: one decode step). The full-batch process runs before and after the mixed one (the mean
of the two is the reference). With ``--first-run`` the mixed file also runs as a first run would: the programs'
default ``--compile auto`` with an empty compiled-step cache (answering eagerly while the step builds in the
background, then switching to it), against the same full-batch reference.
"""

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from machine import describe, git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the river valley town market bridge winter summer harvest engine library garden teacher story science music "
    "history ocean mountain forest village station journey letter window morning evening family friend city road "
    "machine language number light water stone paper field island castle kitchen school doctor painter farmer "
    "sailor north south ancient modern quiet bright careful sudden gentle strong simple curious famous distant"
).split()
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What gas do plants take in from the air?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Which planet is known as the red planet?",
    "What is the largest ocean on Earth?",
    "Translate 'thank you' into Spanish.",
    "What is the chemical symbol for gold?",
]
EQUAL_PROMPT = "Once upon a time, in a small village by the river, there lived an old clockmaker who"


def mixed_records(n: int, seed: int = 0) -> list[dict]:
    """Returns n records: about two thirds text prompts of 12-150 words, a third chat questions."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if rng.random() < 0.34:
            dialog = [{"role": "user", "content": rng.choice(QUESTIONS)}]
            records.append({"id": i, "dialog": dialog, "max_gen_len": 192})
        else:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 150)))
            records.append({"id": i, "prompt": words.capitalize() + ".", "max_gen_len": rng.randint(16, 192)})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_complete(prompts: Path, flags: list[str], threads: int, env: dict | None = None) -> tuple[float, int]:
    """Runs complete.py on prompts in a fresh process (more environment: env); returns (wall seconds, completion
    tokens written)."""
    out = prompts.with_suffix(".out.jsonl")
    for stale in (out, out.with_name(out.name + ".meta.json")):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    cmd = [sys.executable, str(ROOT / "scripts" / "complete.py"), str(prompts), "--output", str(out), *flags]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    tokens = sum(json.loads(line)["completion_tokens"] for line in out.read_text().splitlines())
    return wall, tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=160)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--first-run", action="store_true", help="also the mixed file as a first run (--compile auto)")
    args = p.parse_args(argv)
    flags = ["--max_batch_size", "8", "--temperature", "0", "--max_seq_len", "1024", "--dtype", "float32"]
    flags += ["--compile"] if args.compile else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mixed = write_jsonl(tmp / "mixed.jsonl", mixed_records(args.records))
        equal = [{"id": i, "prompt": EQUAL_PROMPT, "max_gen_len": 192} for i in range(8)]
        full = write_jsonl(tmp / "full.jsonl", equal)
        one = write_jsonl(tmp / "one.jsonl", [{"id": 0, "prompt": EQUAL_PROMPT, "max_gen_len": 2}])
        run_complete(one, flags, args.threads)  # warm-up: builds or loads the compiled step, fills the page cache
        load, _ = run_complete(one, flags, args.threads)
        print(f"load only: {load:.1f} s", file=sys.stderr)
        full_a = run_complete(full, flags, args.threads)
        print(f"full batch: {full_a}", file=sys.stderr)
        mix = run_complete(mixed, flags, args.threads)
        print(f"mixed: {mix}", file=sys.stderr)
        full_b = run_complete(full, flags, args.threads)
        first = None
        if args.first_run:  # an empty cache: the compiled step builds in the background while the run goes on
            auto = [f for f in flags if f != "--compile"] + ["--compile", "auto"]
            first = run_complete(mixed, auto, args.threads, {"LLAMA_GEN_CACHE": str(tmp / "empty-cache")})
            print(f"mixed, first run: {first}", file=sys.stderr)
    rate = lambda wall, tokens, minus=0.0: tokens / (wall - minus)  # noqa: E731
    full_rate = (rate(*full_a) + rate(*full_b)) / 2
    full_rate_loaded = (rate(*full_a, load) + rate(*full_b, load)) / 2
    when = f"{describe('cpu')}, {datetime.date.today()}, {git_commit()}"
    print(f"# Batch completion, mixed file vs full batch ({when})\n")
    print(f"flags: {' '.join(flags)}; {args.records} mixed records; OMP_NUM_THREADS={args.threads}\n")
    print("| process | wall s | completion tokens | tok/s | tok/s after load |")
    print("|---|---|---|---|---|")
    print(f"| load only (1 record, 2 tokens) | {load:.1f} | 2 | | |")
    runs = [("8 equal prompts (before)", full_a), ("mixed", mix), ("8 equal (after)", full_b)]
    runs += [("mixed, first run (--compile auto, empty cache)", first)] if first else []
    for name, (wall, tokens) in runs:
        print(f"| {name} | {wall:.1f} | {tokens} | {rate(wall, tokens):.1f} | {rate(wall, tokens, load):.1f} |")
    print(f"\nmixed / full-batch rate: {rate(*mix) / full_rate:.2f} (whole process), "
          f"{rate(*mix, load) / full_rate_loaded:.2f} (after load)")  # fmt: skip
    if first:
        print(f"mixed first run / full-batch rate: {rate(*first) / full_rate:.2f} (whole process)")


if __name__ == "__main__":
    main()
