"""Quantizes a float checkpoint directory into a new one (group-wise int8 or int4; see llama_gen/apps/quantize.py).

python scripts/quantize.py CKPT_DIR OUT_DIR [--scheme int8-g32|int8-g64|int8-g128|int4-g32|int4-g128|...]
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.quantize import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
