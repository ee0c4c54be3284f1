"""Rewrite a checkpoint for another number of model-parallel ranks.

python scripts/reshard.py --ckpt_dir A --out_dir B --shards M [--overwrite]
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from llama_gen.convert.reshard import reshard  # noqa: E402

if __name__ == "__main__":
    try:
        fire.Fire(reshard)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
