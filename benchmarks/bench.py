"""Benchmarks our engine against Hugging Face transformers and llama.cpp, in one run, on the same model and prompts.

    python benchmarks/bench.py --model default --contenders hf,llamacpp

Each engine runs in its own subprocess (so peak memory is its own), greedy, EOS ignored, on identical token ids:

* prefill tokens/s and time to first token: one ``--prompt-len``-token prompt, one new token;
* decode tokens/s at each ``--batch-sizes``: ``--new-tokens`` per sequence after a 32-token prompt, counted as
  ``batch * (new - 1) / (t(new tokens) - t(1 token))`` so prompt processing is left out;
* peak memory: peak resident memory (VmHWM) minus resident memory right after ``import torch`` (CUDA: peak
  allocated), against the engine's weights + KV cache;
* achieved bandwidth: bytes of weights read per decoded token x batch-1 decode tokens/s, against the machine's
  read bandwidth (a large tensor's sum, best of the probes just before and just after the engine).

Times are medians of ``--runs`` runs after a warm-up run; compilation (ours: on CPU ahead of time in a child
process, llama_gen/aot.py, else ``torch.compile``) happens in a separate warm-up and is reported on its own, with
the peak memory of any compiler child process (outside the engine's own peak). With ``--rounds N`` every engine
runs N times, in alternating order, and each figure is its best round's (memory: its worst round's): on a shared
machine whose memory bandwidth drifts over minutes, that keeps one engine's quiet stretch from deciding a ratio.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

DECODE_PROMPT_LEN = 32
TEXT = (
    "The lighthouse keeper kept a careful log of every ship that passed the point. In the spring of the year "
    "the storms came early, and the keeper wrote about the colour of the sea, the direction of the wind, and the "
    "names of the fishing boats that returned late to the harbour. Each evening he climbed the narrow stairs, "
    "trimmed the wick, polished the great lens, and watched the beam sweep across the water. The villagers said "
    "that he never missed a night in forty years, and that his logbooks, stacked in the cellar, held the history "
    "of the whole coast: wrecks and rescues, weddings announced by ships' horns, the first steamer and the last "
    "sailing barge. "
)


# ---- worker: one engine in its own process -----------------------------------------------------------------


def median_time(fn, runs: int) -> float:
    from engines import timed

    return statistics.median(timed(fn)[0] for _ in range(runs))


def run_worker(cfg: dict) -> dict:
    import machine
    import torch
    from engines import ModelSpec, make_engine, timed

    base_rss = machine.rss_mib()  # right after `import torch`
    torch.set_num_threads(cfg["threads"])
    device, runs, new = cfg["device"], cfg["runs"], cfg["new_tokens"]
    spec = ModelSpec(**cfg["model"])
    load_s, engine = timed(
        lambda: make_engine(
            cfg["engine"], spec, device, cfg["threads"], cfg["max_seq_len"], max(cfg["batch_sizes"]), cfg["compile"]
        )
    )
    result = {"engine": engine.name, "load_s": load_s, "rss_loaded_mib": machine.rss_mib() - base_rss}
    batch_sizes = [b for b in cfg["batch_sizes"] if b <= engine.max_batch]
    start = time.perf_counter()
    engine.warm_up(batch_sizes, DECODE_PROMPT_LEN + new)
    result["compile_s"] = engine.compile_s if engine.compile_s is not None else None
    result["child_peak_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # 0: no child ran
    result["warm_up_s"] = time.perf_counter() - start

    long_prompt = cfg["prompt"][: cfg["prompt_len"]]
    engine.generate([long_prompt], 1)  # warm-up
    ttft = median_time(lambda: engine.generate([long_prompt], 1), runs)
    result.update(ttft_s=ttft, prefill_tps=len(long_prompt) / ttft)

    result["decode"] = {}
    for bsz in batch_sizes:
        prompts = [cfg["prompt"][i * 7 : i * 7 + DECODE_PROMPT_LEN] for i in range(bsz)]
        outputs = engine.generate(prompts, new)  # warm-up (and the tokens we compare across engines)
        assert all(len(o) == new for o in outputs), [len(o) for o in outputs]
        first = median_time(lambda prompts=prompts: engine.generate(prompts, 1), runs)
        full = median_time(lambda prompts=prompts: engine.generate(prompts, new), runs)
        # Decode speed excludes the prompt: (full - first token) time. With very few new tokens on a noisy
        # machine that difference can vanish; the table then shows "—" rather than a meaningless rate.
        tps = bsz * (new - 1) / (full - first) if full > first else None
        if tps is None:
            print(f"{engine.name} b{bsz}: decode time below timing noise (use more --new-tokens)", file=sys.stderr)
        result["decode"][str(bsz)] = {"tps": tps, "t_first_s": first, "t_full_s": full, "tokens": outputs[0]}

    if device.startswith("cuda"):
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mib"] = machine.peak_rss_mib() - base_rss
    result.update(
        weights_mib=engine.weights_bytes / 2**20,
        kv_mib=engine.kv_bytes / 2**20,
        read_bytes_per_token=engine.read_bytes_per_token,
    )
    return result


# ---- parent: prepare the model, run every engine, report -------------------------------------------------


def default_model_spec() -> dict:
    from llama_gen.convert import DEFAULT_GGUF, default_gguf, ensure_default_model

    ckpt = ensure_default_model()
    gguf = default_gguf()
    return dict(kind="default", ckpt_dir=str(ckpt), hf_dir=str(gguf.parent), gguf_file=DEFAULT_GGUF)


def tiny_model_spec(workdir: Path) -> dict:
    """A tiny random Llama (vocab 32000, Llama 2 tokenizer) saved for transformers and converted for us."""
    import torch
    from engines import LLAMA2_TOKENIZER
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_gen.convert import convert_hf

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=176,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf_dir, ckpt = workdir / "hf", workdir / "meta"
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)  # decisive logits, so greedy outputs are comparable across engines
    model.save_pretrained(hf_dir)
    convert_hf(hf_dir, ckpt)
    return dict(kind="tiny", ckpt_dir=str(ckpt), tokenizer_path=str(LLAMA2_TOKENIZER), hf_dir=str(hf_dir))


def prompt_tokens(spec: dict, n: int) -> list[int]:
    from engines import LLAMA2_TOKENIZER

    from llama_gen.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec.get("tokenizer_path") or spec.get("ckpt_dir") or LLAMA2_TOKENIZER)
    tokens, i = [], 0
    while len(tokens) < n:
        tokens += tokenizer.encode(f"Chapter {i + 1}. " + TEXT, bos=False, eos=False)
        i += 1
    return tokens[:n]


def engine_names(args) -> list[str]:
    names = [f"ours:{v}" for v in args.ours.split(",") if v]
    for contender in [c for c in args.contenders.split(",") if c]:
        if contender == "hf":
            names += [f"hf:{d}" for d in args.hf_dtypes.split(",")]
        elif contender.startswith("llamacpp"):
            names.append(contender)
        else:
            raise SystemExit(f"unknown contender {contender!r}: use hf and/or llamacpp")
    return names


def run_engine(name: str, cfg: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg_path.write_text(json.dumps({**cfg, "engine": name}))
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"])}
        proc = subprocess.run(
            [sys.executable, str(Path(__file__)), "--worker", str(cfg_path), str(out_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"engine": name, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
        return json.loads(out_path.read_text())


def best_of_rounds(rounds: list[dict]) -> dict:
    """Returns one engine's result over several rounds: each speed from its best round (prefill with its TTFT,
    each batch size's decode, batch 1 with its bandwidth probe), memory and compile time from the worst."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    best = dict(max(ok, key=lambda r: r["prefill_tps"]))
    best["decode"] = {}
    for bsz in ok[0]["decode"]:
        fastest = max(ok, key=lambda r: r["decode"][bsz]["tps"] or 0.0)
        best["decode"][bsz] = {**fastest["decode"][bsz], "tokens": ok[0]["decode"][bsz]["tokens"]}
        if bsz == "1":
            best["probe_read_gbs"] = fastest["probe_read_gbs"]
    for key in ("peak_mib", "rss_loaded_mib", "child_peak_mib", "compile_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        best[key] = max(values) if values else None
    best["rounds"] = len(ok)
    return best


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def results_table(results: list[dict], batch_sizes: list[int]) -> str:
    """Returns the per-engine markdown table; "% of BW" is against the engine's own probe (``probe_read_gbs``)."""
    head = (
        ["engine", "prefill tok/s", "TTFT ms"]
        + [f"decode b{b} tok/s" for b in batch_sizes]
        + ["peak MiB", "weights+KV MiB", "peak/(w+KV)", "GB/s (b1)", "probe GB/s", "% of BW", "compile s", "load s"]
    )
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["engine"], f"failed: {r['error']}"] + [""] * (len(head) - 2))
            continue
        decode = [r["decode"].get(str(b), {}).get("tps") for b in batch_sizes]
        b1 = r["decode"].get("1", {}).get("tps")
        achieved = r["read_bytes_per_token"] * b1 / 1e9 if b1 else None
        probe = r["probe_read_gbs"]
        wkv = r["weights_mib"] + r["kv_mib"]
        rows.append(
            [r["engine"], fmt(r["prefill_tps"]), fmt(r["ttft_s"] * 1000, ".0f")]
            + [fmt(d) for d in decode]
            + [
                fmt(r["peak_mib"], ".0f"),
                fmt(wkv, ".0f"),
                fmt(r["peak_mib"] / wkv, ".2f"),
                fmt(achieved),
                fmt(probe),
                fmt(achieved and 100 * achieved / probe, ".0f"),
                fmt(r.get("compile_s")),
                fmt(r["load_s"]),
            ]
        )
    return markdown_table(head, rows)


def ratio_table(results: list[dict], batch_sizes: list[int]) -> str:
    ours = [r for r in results if r["engine"].startswith("ours") and "error" not in r]
    others = [r for r in results if not r["engine"].startswith("ours") and "error" not in r]
    head = (
        ["ours / contender", "prefill", "TTFT (lower is better)"] + [f"decode b{b}" for b in batch_sizes] + ["peak mem"]
    )
    rows = []
    for o in ours:
        for c in others:

            def ratio(get, o=o, c=c):
                a, b = get(o), get(c)
                return fmt(a / b, ".2f") + "×" if a and b else "—"

            rows.append(
                [f"{o['engine']} / {c['engine']}", ratio(lambda r: r["prefill_tps"]), ratio(lambda r: r["ttft_s"])]
                + [ratio(lambda r, b=b: r["decode"].get(str(b), {}).get("tps")) for b in batch_sizes]
                + [ratio(lambda r: r["peak_mib"])]
            )
    return markdown_table(head, rows) if rows else ""


def agreement(results: list[dict]) -> str:
    """Returns how many of the first greedy tokens (the first sequence's, at each batch size both ran) each engine
    shares with the first engine."""
    done = [r for r in results if "error" not in r]
    if len(done) < 2:
        return ""
    ref = done[0]
    lines = []
    for r in done[1:]:
        for bsz in [b for b in ref["decode"] if b in r["decode"]]:
            a, b = ref["decode"][bsz]["tokens"], r["decode"][bsz]["tokens"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            lines.append(f"{r['engine']} at batch {bsz}: first {same} of {len(a)} greedy tokens equal")
    return "Greedy outputs vs " + ref["engine"] + ": " + "; ".join(lines) if lines else ""


def child_peaks(results: list[dict]) -> str:
    """Returns a line with the peak memory of the compiler child processes, for engines that ran any."""
    peaks = [f"{r['engine']} {r['child_peak_mib']:.0f} MiB" for r in results if r.get("child_peak_mib")]
    return (
        (
            "Peak resident memory of compiler child processes (ahead-of-time builds; not in the engine's peak "
            "above): " + "; ".join(peaks)
        )
        if peaks
        else ""
    )


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", choices=["default", "tiny", "7b-random"])
    p.add_argument(
        "--ours",
        default="fp32,int8",
        help="our variants: fp32, bf16, int8 (fp32 activations), int8-bf16 (bf16 activations), a group-wise "
        "--quantize name (int8-g32, int4-g32, ...), q4_1 (the default GGUF's own blocks), q4_1-bf16 (them in a bf16 "
        "model: PyTorch's int4 kernel); a suffix "
        "@N builds that variant with max_batch_size=N (timed at batch sizes <= N only)",
    )
    p.add_argument(
        "--contenders",
        default="hf,llamacpp",
        help="comma list of hf, llamacpp (the model's GGUF), llamacpp:Q8_0 (it requantized to Q8_0 by the gguf "
        "package); llama.cpp is skipped if not installed",
    )
    p.add_argument("--hf-dtypes", default="fp32", help="dtypes HF transformers runs in, e.g. fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every engine this many times, in alternating order, and report each one's best round "
        "(memory: its worst); on a shared machine whose bandwidth drifts, 2 makes ratios steadier",
    )
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--no-compile", action="store_true", help="run our engine eagerly (no torch.compile)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth-test tensor")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per engine")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--markdown", help="write the report (tables) to this markdown file")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        p.error("--rounds and --runs must be at least 1")

    if args.worker:
        cfg = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(run_worker(cfg)))
        return

    import machine
    import torch

    torch.set_num_threads(args.threads)
    names = engine_names(args)
    if any(n.startswith("llamacpp") for n in names) and not llamacpp_available():
        print("llama-cpp-python is not installed: skipping llama.cpp (pip install llama-cpp-python)", file=sys.stderr)
        names = [n for n in names if not n.startswith("llamacpp")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "default":
            spec = default_model_spec()
        elif args.model == "tiny":
            spec = tiny_model_spec(Path(tmp))
        else:
            spec = dict(kind="7b-random")
            names = [n for n in names if not n.startswith("llamacpp")]  # no GGUF for random weights
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        # A shared machine's bandwidth drifts with its other tenants (a 1 GiB sum read 33 then 57 GB/s a minute
        # apart on the AMD EPYC of RESULTS.md): it is probed between engines, and each engine's reference is the
        # best of the probes just before and just after it.
        probes = [machine.memory_bandwidth(args.device, args.bandwidth_gib)]
        cfg = dict(
            model=spec,
            device=args.device,
            threads=args.threads,
            runs=args.runs,
            new_tokens=args.new_tokens,
            prompt_len=args.prompt_len,
            batch_sizes=batch_sizes,
            max_seq_len=args.max_seq_len,
            compile=not args.no_compile,
            prompt=prompt_tokens(spec, max(args.prompt_len, 7 * 8 + 64)),
        )
        per_engine: dict[str, list[dict]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            # Alternate the order, so that no engine always runs in the same stretch of a drifting machine.
            for name in names if round_index % 2 == 0 else names[::-1]:
                print(f"running {name} (round {round_index + 1} of {args.rounds}) ...", file=sys.stderr, flush=True)
                result = run_engine(name, cfg, args.timeout)
                if "error" in result:
                    print(f"  {name} failed: {result['error']}", file=sys.stderr)
                probes.append(machine.memory_bandwidth(args.device, args.bandwidth_gib))
                result["probe_read_gbs"] = max(probes[-2]["read_gbs"], probes[-1]["read_gbs"])
                per_engine[name].append(result)
        results = [best_of_rounds(per_engine[name]) for name in names]
        bandwidth = {key: max(probe[key] for probe in probes) for key in probes[0]}

    reads = [probe["read_gbs"] for probe in probes]
    header = (
        f"Machine: {machine.describe(args.device)}; measured read bandwidth {min(reads):.1f}-{max(reads):.1f} "
        f"GB/s ({len(reads)} probes, between engines; copy up to {bandwidth['copy_gbs']:.1f} GB/s). "
        f"Date {datetime.date.today()}, commit {machine.git_commit()}.\n"
        f"Command: `python benchmarks/bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"model {args.model}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"{args.threads} threads, medians of {args.runs} runs"
        + (f", best of {args.rounds} rounds (engines in alternating order)." if args.rounds > 1 else ".")
    )
    report = "\n\n".join(
        x
        for x in [
            header,
            results_table(results, batch_sizes),
            ratio_table(results, batch_sizes),
            agreement(results),
            child_peaks(results),
        ]
        if x
    )
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    if args.json:
        config = {k: v for k, v in cfg.items() if k != "prompt"}
        Path(args.json).write_text(
            json.dumps(
                {
                    "bandwidth": bandwidth,
                    "bandwidth_probes": probes,
                    "results": results,
                    "rounds": per_engine,
                    "config": config,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
