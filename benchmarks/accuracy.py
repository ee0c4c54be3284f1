"""Accuracy of int8 weights (and of the compiled fp32 path) against the eager fp32 reference on the default model.

    python benchmarks/accuracy.py [--new-tokens 64] [--no-compile]

For each prompt, the fp32 eager model decodes greedily; the other variant is then fed the same tokens and its
logits compared position by position (prompt positions through the prefill path, generated positions through
the decode step, i.e. the paths generation actually uses). Also reported: free-running greedy agreement.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics are",
    "Q: What is 17 times 23?\nA:",
    "Photosynthesis is the process by which",
    "Here is a list of five fruits:\n1.",
    "In 1969, Apollo 11",
]


def teacher_forced_logits(llama, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Logits [len - 1, vocab]: a prefill of the prompt, then one decode step per following token."""
    forward = llama.forward
    ids = torch.tensor([tokens])
    steps = [forward(ids[:, :prompt_len], 0)[0]]
    steps += [forward(ids[:, i : i + 1], i)[0] for i in range(prompt_len, len(tokens) - 1)]
    return torch.cat(steps)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(reference, other, prompts: list[list[int]], new_tokens: int) -> dict:
    expected, _ = reference.generate(prompts, max_gen_len=new_tokens, temperature=0)
    got, _ = other.generate(prompts, max_gen_len=new_tokens, temperature=0)
    max_delta, mean_delta, top1, prefixes = [], [], [], []
    for prompt, exp, out in zip(prompts, expected, got):
        full = prompt + exp
        with torch.inference_mode():
            ref_logits = teacher_forced_logits(reference, full, len(prompt))
            logits = teacher_forced_logits(other, full, len(prompt))
        delta = (logits - ref_logits).abs()
        max_delta.append(delta.max().item())
        mean_delta.append(delta.mean().item())
        top1.append((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item())
        prefixes.append(common_prefix(exp, out))
    return {
        "logit_max_abs_delta": max(max_delta),
        "logit_mean_abs_delta": statistics.mean(mean_delta),
        "teacher_forced_top1_agreement": statistics.mean(top1),
        "identical_greedy_outputs": sum(p == new_tokens for p in prefixes),
        "prompts": len(prompts),
        "mean_common_prefix": statistics.mean(prefixes),
        "new_tokens": new_tokens,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="compare the uncompiled fast path instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llama_gen import Llama
    from llama_gen.fast import FastForward

    common = dict(max_seq_len=512, max_batch_size=len(PROMPTS), device="cpu", dtype="float32")
    reference = Llama.build(**common)
    reference.eos_ids = []
    prompts = [reference.tokenizer.encode(t, bos=False, eos=False) for t in PROMPTS]
    rows = []
    for name, kwargs in [
        ("fp32 fast path (fused, static step)", dict(compile=not args.no_compile)),
        ("int8 weights", dict(compile=not args.no_compile, quantize="int8")),
    ]:
        if "quantize" not in kwargs and not kwargs["compile"]:
            continue  # the uncompiled fp32 fast path is pinned by tests/fast/test_forward.py
        other = Llama.build(**common, **kwargs)
        if not isinstance(other.forward, FastForward):
            other = Llama(other.model, other.tokenizer, forward=FastForward(other.model, compile=False))
        other.eos_ids = []
        rows.append((name, compare(reference, other, prompts, args.new_tokens)))
        del other
    print(
        f"Against eager fp32, {len(PROMPTS)} prompts, {args.new_tokens} greedy tokens each, "
        f"{'compiled' if not args.no_compile else 'uncompiled'} decode step:\n"
    )
    print(
        "| variant | logit max abs Δ | logit mean abs Δ | teacher-forced top-1 agreement "
        "| identical greedy outputs | mean common prefix |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['logit_max_abs_delta']:.4f} | {r['logit_mean_abs_delta']:.4f} | "
            f"{100 * r['teacher_forced_top1_agreement']:.1f}% | {r['identical_greedy_outputs']}/{r['prompts']} | "
            f"{r['mean_common_prefix']:.1f} / {r['new_tokens']} |"
        )


if __name__ == "__main__":
    main()
