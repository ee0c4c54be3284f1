"""``llama-gen convert``: a GGUF file or Hugging Face directory into a checkpoint directory.

llama-gen convert SRC OUT_DIR [--dtype float32|bfloat16|float16] [--keep_quantized]
llama-gen convert            # the default SmolLM2-135M-Instruct model
llama-gen convert --keep_quantized   # it, 4-bit as shipped (checkpoints/smollm2-135m-instruct-q4_1)

--keep_quantized keeps a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are (a quantized checkpoint, exactly
llama.cpp's numbers, ~1/7 of the float32 size) instead of converting them to float.
"""

from llama_gen.apps.errors import friendly_errors


@friendly_errors
def main(
    src: str | None = None, out_dir: str | None = None, dtype: str = "float32", keep_quantized: bool = False
) -> None:
    """Converts a GGUF file or Hugging Face directory into a checkpoint directory (no SRC: the default model);
    prints the directory and returns None."""
    from llama_gen.convert import convert, ensure_default_model  # the conversion libraries load only when used

    if src is None:
        print(ensure_default_model(out_dir, keep_quantized=keep_quantized))
    elif out_dir is None:
        raise ValueError("usage: llama-gen convert SRC OUT_DIR [--dtype float32|bfloat16|float16] [--keep_quantized]")
    else:
        print(convert(src, out_dir, dtype, keep_quantized))
