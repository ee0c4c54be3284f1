"""The per-row-position decode step against the one-position step it replaced, at batch 1 and 8, in one run.

    python benchmarks/step_positions.py [--batch-sizes 1,8] [--pos 200] [--steps 40] [--rounds 3]

The serving engine needs every row of a decode step at its own position (rotary angles, cache write and mask row
per row); the padded loop had one position for the whole batch. Both steps here run the default model (float32,
2 threads) prepared as the compiled fast path prepares it (its CPU weight layout), both compiled in this process
by ``torch.compile(fullgraph=True)`` with the same settings, at the same position and attention window; each
figure is the median time of ``--steps`` steps, the steps alternating between the two in every round, best
round of ``--rounds``. ``one_position_step`` is the step as it was at commit 9e6914b, kept here only to measure
against.
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from machine import describe, git_commit  # noqa: E402

from llama_gen import Llama  # noqa: E402
from llama_gen.fast.step import attention_window, decode_step  # noqa: E402
from llama_gen.model import Attention, Transformer  # noqa: E402


def one_position_attention(
    attn: Attention, x: torch.Tensor, input_pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, window: int
) -> torch.Tensor:
    """The attention of the step before per-row positions: every row at position ``input_pos`` ``[1]``."""
    bsz, _, _ = x.shape
    q, k, v = attn.project(x, rope)
    where = (torch.arange(bsz, device=x.device)[:, None], input_pos[None, :])
    attn.cache_k.index_put_(where, k)
    attn.cache_v.index_put_(where, v)
    keys, values = attn.cache_k[:bsz, :window], attn.cache_v[:bsz, :window]
    n_heads, head_dim, n_kv = q.shape[2], q.shape[3], keys.shape[2]
    grouped = q.view(bsz, 1, n_kv, n_heads // n_kv, head_dim).float()
    scores = (grouped * keys[:, :, :, None, :].float()).sum(-1) * head_dim**-0.5
    probs = scores.masked_fill(~mask.view(1, -1, 1, 1), float("-inf")).softmax(dim=1)
    out = (probs[..., None] * values[:, :, :, None, :].float()).sum(1)
    return attn.wo(out.reshape(bsz, 1, n_heads * head_dim).type_as(q))


def one_position_step(
    model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, mask_columns: torch.Tensor
) -> torch.Tensor:
    """The decode step before per-row positions (commit 9e6914b): tokens ``[b, 1]`` all at ``input_pos`` ``[1]``."""
    window = mask_columns.shape[1]
    h = model.tok_embeddings(tokens)
    rope, mask_row = model.rope[input_pos], mask_columns[input_pos]
    for layer in model.layers:
        h = h + one_position_attention(layer.attention, layer.attention_norm(h), input_pos, rope, mask_row, window)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()


def median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--pos", type=int, default=200, help="the position every row decodes at")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    llama = Llama.build(max_seq_len=1024, max_batch_size=max(sizes), dtype="float32", compile=True)
    model, forward = llama.model, llama.forward  # prepared with the compiled path's layout
    window = attention_window(args.pos, model.args.max_seq_len)
    mask_columns = forward.mask[:, :window]
    steps = {
        "one position": torch.compile(one_position_step, fullgraph=True, dynamic=False),
        "per-row positions": torch.compile(decode_step, fullgraph=True, dynamic=False),
    }
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for bsz in sizes:
                tokens = torch.randint(0, 1000, (bsz, 1))
                inputs = {"one position": torch.tensor([args.pos]), "per-row positions": torch.full((bsz,), args.pos)}
                for name, step in steps.items():
                    call = lambda: step(model, tokens, inputs[name], mask_columns)  # noqa: B023, E731
                    call()  # compiles on the first round
                    ms = median_ms(call, args.steps)
                    best[name, bsz] = min(best.get((name, bsz), ms), ms)
    print(f"# Decode step: per-row positions vs one position ({describe('cpu')}, {datetime.date.today()}, "
          f"{git_commit()})\n")  # fmt: skip
    print(f"default model, float32, position {args.pos} (window {window}), median of {args.steps} steps, best of "
          f"{args.rounds} rounds\n")  # fmt: skip
    print("| batch | one position (ms) | per-row positions (ms) | per-row / one |")
    print("|---|---|---|---|")
    for bsz in sizes:
        one, per_row = best["one position", bsz], best["per-row positions", bsz]
        print(f"| {bsz} | {one:.2f} | {per_row:.2f} | {per_row / one:.3f} |")


if __name__ == "__main__":
    main()
