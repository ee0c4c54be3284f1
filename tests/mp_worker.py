"""Run under torchrun by tests/test_parallel.py: builds each checkpoint model-parallel and saves this rank's results.

    python -m torch.distributed.run --nproc_per_node 2 tests/mp_worker.py --out DIR --tokenizer T.model CKPT...

Each rank writes DIR/rank{RANK}.pt: {"facts": {...}, CKPT: run_checks(...)} so the test can compare every
rank with the single-process run and with each other.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from llama_gen import Llama, parallel

PROMPTS = [[1, 450, 4996, 17354, 1701, 29916], [1, 15043], [1, 306, 4658, 278, 6593, 310, 2834, 338]]


def build(ckpt: str, tokenizer: str, model_parallel_size: int | None = None) -> Llama:
    """Returns a float32 CPU Llama for the parallel tests."""
    return Llama.build(
        ckpt,
        tokenizer_path=tokenizer,
        max_seq_len=64,
        max_batch_size=4,
        device="cpu",
        dtype="float32",
        model_parallel_size=model_parallel_size,
    )


def run_checks(llama: Llama) -> dict:
    """Returns logits (full prefill and through the KV cache), greedy and sampled tokens and logprobs."""
    model = llama.model
    tokens = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    full = model.forward(tokens, 0)
    steps = [model.forward(tokens[:, :16], 0)] + [model.forward(tokens[:, i : i + 1], i) for i in range(16, 24)]
    greedy, greedy_logprobs = llama.generate(PROMPTS, max_gen_len=10, temperature=0, logprobs=True)
    seeded, _ = llama.generate(PROMPTS, max_gen_len=10, temperature=1.0, top_p=0.95, seed=3)
    global_rng, _ = llama.generate(PROMPTS, max_gen_len=10, temperature=1.0, top_p=1.0)  # seeded by build
    attention = model.layers[0].attention
    return {
        "logits": full,
        "cached_logits": torch.cat(steps, dim=1),
        "greedy": greedy,
        "greedy_logprobs": greedy_logprobs,
        "seeded": seeded,
        "global_rng": global_rng,
        "output_layer": type(model.output).__name__,
        "local_kv_heads": attention.cache_k.shape[2],
        "local_heads": attention.n_local_heads,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--model_parallel_size", type=int, default=None)
    parser.add_argument("ckpts", nargs="+")
    args = parser.parse_args()
    results = {}
    for ckpt in args.ckpts:
        results[ckpt] = run_checks(build(ckpt, args.tokenizer, args.model_parallel_size))
    results["facts"] = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "mp_rank": parallel.model_parallel_rank(),
        "mp_world_size": parallel.model_parallel_world_size(),
        "dp_rank": parallel.data_parallel_rank(),
        "dp_world_size": parallel.data_parallel_world_size(),
    }
    torch.save(results, Path(args.out) / f"rank{os.environ['RANK']}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
