"""Batch completion of a prompt file (.txt: one prompt per line; .jsonl: {"id", "prompt" | "dialog", ...}).

    python scripts/complete.py PROMPTS.jsonl [--output OUT.jsonl] [--max_batch_size 8] [--temperature 0]
    torchrun --nproc_per_node 4 scripts/complete.py PROMPTS.jsonl --model_parallel_size 2   # 2 replicas x 2

Rerun the same command after a crash to finish the prompts not yet in the output.
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.batch import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
