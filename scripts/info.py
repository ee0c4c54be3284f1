"""Parameter count, weight memory, KV-cache size and device fit of a checkpoint, from params.json alone.

python scripts/info.py [--ckpt_dir DIR] [--max_seq_len 2048] [--max_batch_size 4] [--dtype bf16] [--json_output]
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.info import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
