"""An OpenAI-compatible HTTP server for a Llama-style model (chat and text completions, streaming, metrics).

python scripts/serve.py [--ckpt_dir DIR] [--port 8000] [--max_batch_size 8] [--api_key KEY] [--temperature 0.7]
torchrun --nproc_per_node 2 scripts/serve.py --ckpt_dir DIR      # model parallel: rank 0 serves HTTP
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.serve import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
