"""``llama-gen convert``: a GGUF file or Hugging Face directory into a checkpoint directory.

llama-gen convert SRC OUT_DIR [--dtype float32|bfloat16|float16]
llama-gen convert            # the default SmolLM2-135M-Instruct model
"""

from llama_gen.apps.errors import friendly_errors


@friendly_errors
def main(src: str | None = None, out_dir: str | None = None, dtype: str = "float32") -> None:
    """Converts a GGUF file or Hugging Face directory into a checkpoint directory (no SRC: the default model);
    prints the directory and returns None."""
    from llama_gen.convert import convert, ensure_default_model  # the conversion libraries load only when used

    if src is None:
        print(ensure_default_model(out_dir))
    elif out_dir is None:
        raise ValueError("usage: llama-gen convert SRC OUT_DIR [--dtype float32|bfloat16|float16]")
    else:
        print(convert(src, out_dir, dtype))
