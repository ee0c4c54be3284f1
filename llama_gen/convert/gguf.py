"""llama.cpp GGUF files (llama and qwen2 architectures, any tensor type the gguf package dequantizes) -> Meta
checkpoint directories.

llama.cpp's convert_hf_to_gguf un-permutes Hugging Face's q/k rows when it writes a llama GGUF, so those q/k rows
are already in Meta's interleaved rotary layout and are copied as they are; qwen2 GGUFs (rotate-half "NEOX" rope in
llama.cpp) keep Hugging Face's layout and are un-permuted as Hugging Face directories are (checked against
transformers in tests/convert/test_gguf.py).
"""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_gen import files
from llama_gen.convert.chat_template import chat_settings
from llama_gen.convert.gguf_blocks import blocks_state_dict
from llama_gen.convert.gguf_tokenizer import gguf_tokenizer
from llama_gen.convert.hf import rotate_half_to_meta
from llama_gen.convert.meta_checkpoint import (
    GGUF,
    build_state_dict,
    checkpoint_dtype,
    meta_names,
    meta_params,
    write_checkpoint,
)

ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling, stored as per-frequency divisors
ARCHITECTURES = ("llama", "qwen2")  # qwen2: biases on q, k and v, q/k rows in Hugging Face's rotate-half layout


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", keep_quantized: bool = False
) -> Path:
    """Converts a llama or qwen2 GGUF file to a Meta checkpoint; returns out_dir. Its tensors are dequantized into
    ``dtype``, or with ``keep_quantized`` (llama only) its Q8_0/Q4_0/Q4_1 blocks are kept as they are (a quantized
    checkpoint, llama_gen.convert.gguf_blocks; other tensors in ``dtype``)."""
    torch_dtype = checkpoint_dtype(dtype)
    src, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(src)
    meta = gguf_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = dequantize(by_name[ROPE_FREQS], src) if ROPE_FREQS in by_name else None
    params = gguf_params(meta, rope_freqs, src)
    tokenizer, tokenizer_config = gguf_tokenizer(meta, src)  # fail on an unsupported tokenizer before the slow part
    tensors = gguf_tensors(reader, params["n_layers"], src)
    rotate_half = meta["general.architecture"] == "qwen2"
    if keep_quantized:
        if rotate_half:
            raise ValueError(f"{src}: --keep_quantized supports llama GGUFs only; convert this qwen2 file to float")
        state, params["quantization"] = blocks_state_dict(tensors, params, torch_dtype, src, dequantize)
    else:
        floats = ((name, torch.from_numpy(dequantize(t, src))) for name, t in tensors)
        if rotate_half:  # qwen2: q/k rows in Hugging Face's rotate-half layout
            floats = ((name, rotate_half_to_meta(name, w, params)) for name, w in floats)
        state = build_state_dict(floats, params, torch_dtype, src, tied="output.weight" not in by_name)
    write_checkpoint(out_dir, params, state, gguf_generation_config(meta))
    del state
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def open_gguf(src: Path) -> Any:
    """Returns a gguf.GGUFReader over ``src``, or raises ValueError if it is not a readable GGUF file."""
    from gguf import GGUFReader

    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: give the path of a .gguf file or of a Hugging Face directory")
    try:
        return GGUFReader(str(src))
    except (ValueError, OSError, IndexError, KeyError) as e:  # the reader's errors for truncated or foreign bytes
        raise files.damaged(src, "is not a readable GGUF file", e) from e  # truncated, damaged or not GGUF


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Returns a GGUF file's key/value metadata as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def llama_key(meta: dict[str, Any], key: str, src: Path, default: Any = None) -> Any:
    """Returns metadata ``<architecture>.<key>`` (e.g. llama.block_count) or ``default``; raises ValueError if it
    is missing."""
    name = f"{meta.get('general.architecture')}.{key}"
    value = meta.get(name, default)
    if value is None:
        raise ValueError(f"{src}: metadata {name} is missing")
    return value


def gguf_shape(meta: dict[str, Any], src: Path) -> dict[str, int]:
    """Returns dim, n_layers, n_heads, n_kv_heads and vocab_size of a llama or qwen2 GGUF, or raises for files
    llama_gen's model cannot run."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{src}: architecture {arch!r} is not supported; only {' and '.join(ARCHITECTURES)} GGUF files can be "
            "converted"
        )
    dim, n_heads = llama_key(meta, "embedding_length", src), llama_key(meta, "attention.head_count", src)
    head_dim = dim // n_heads
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if llama_key(meta, key, src, head_dim) != head_dim:
            raise NotImplementedError(
                f"{src}: {arch}.{key} = {meta[f'{arch}.{key}']} differs from embedding_length // head_count = "
                f"{head_dim}, which llama_gen's model assumes"
            )
    scaling_type = llama_key(meta, "rope.scaling.type", src, "none")
    if scaling_type != "none":
        raise NotImplementedError(f"{src}: rope scaling type {scaling_type!r} is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise ValueError(f"{src}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    n_layers, n_kv = llama_key(meta, "block_count", src), llama_key(meta, "attention.head_count_kv", src, n_heads)
    return {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "vocab_size": vocab}


def gguf_params(meta: dict[str, Any], rope_freqs: np.ndarray | None, src: Path) -> dict[str, Any]:
    """Returns Meta params.json contents for a llama or qwen2 GGUF, or raises for unsupported files."""
    shape = gguf_shape(meta, src)
    head_dim = shape["dim"] // shape["n_heads"]
    hidden = llama_key(meta, "feed_forward_length", src)
    theta = float(llama_key(meta, "rope.freq_base", src, 10000.0))
    scaling = None
    if rope_freqs is not None:
        old_context = llama_key(meta, "rope.scaling.original_context_length", src, 0) or None
        scaling = llama3_scaling_from_factors(rope_freqs, head_dim, theta, old_context, src)
    norm_eps = float(llama_key(meta, "attention.layer_norm_rms_epsilon", src))
    return meta_params(shape, hidden, norm_eps, theta, scaling, qkv_bias=meta["general.architecture"] == "qwen2")


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """Returns llama.cpp's ``rope_freqs`` divisors (original / scaled frequency) for Llama 3.1 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, blended))


def llama3_scaling_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, old_context: int | None, src: Path
) -> dict[str, Any]:
    """Returns the Llama 3.1 rope_scaling dict that reproduces a GGUF's ``rope_freqs`` tensor, or raises."""
    # llama.cpp stores only the per-frequency divisors. The largest is `factor`; low/high are Meta's 1 and 4 in
    # every Llama 3.x; the original context is solved from a divisor inside the smooth band (or taken from
    # metadata / the usual 8192). Whatever we pick must give back the stored tensor.
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    factor, low, high = float(np.float32(factors.max())), 1.0, 4.0
    candidates = [old_context] if old_context else []
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factor > 1 and factors.shape == wavelen.shape:
        band = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        candidates += [round(float(c)) for c in wavelen[band] * (low + smooth * (high - low))]
    candidates += [8192] + [2**k for k in range(6, 21)]
    for context in candidates:
        scaling = {
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": int(context),
        }
        if factors.shape == wavelen.shape and np.allclose(
            llama3_rope_factors(head_dim, theta, scaling), factors, rtol=1e-5, atol=1e-6
        ):
            return scaling
    raise NotImplementedError(
        f"{src}: tensor rope_freqs.weight ({factors.tolist()}) does not match Llama 3.1 rope scaling "
        "(low_freq_factor 1, high_freq_factor 4); this rope scaling is not supported"
    )


def dequantize(tensor: Any, src: Path) -> np.ndarray:
    """Returns a GGUF tensor as a float32 numpy array of shape [rows, cols] (GGUF lists dims innermost first)."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(tensor.tensor_type)
    try:
        data = quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise NotImplementedError(
            f"{src}: tensor {tensor.name} has type {kind.name}, which the gguf package cannot dequantize; "
            "requantize the model to Q8_0/Q4_0/Q4_1/F16/F32 (or upgrade gguf)"
        ) from None
    data = np.asarray(data, dtype=np.float32)
    if not data.flags.writeable:  # F32 tensors come back as views of the read-only memory map
        data = data.copy()
    return data.reshape([int(d) for d in reversed(tensor.shape)])


def gguf_tensors(reader: Any, n_layers: int, src: Path) -> list[tuple[str, Any]]:
    """Returns (Meta name, GGUF tensor) for the model tensors of a GGUF file."""
    names = meta_names(n_layers, GGUF, "blk.{i}.")
    unexpected = [t.name for t in reader.tensors if t.name != ROPE_FREQS and t.name not in names]
    if unexpected:
        raise ValueError(f"{src}: unexpected tensor {unexpected[0]} (not part of a plain Llama model)")
    return [(names[t.name], t) for t in reader.tensors if t.name != ROPE_FREQS]


def gguf_generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """Returns our generation_config.json for a GGUF: stop-token ids and chat format (GGUFs store no sampling keys)."""
    keys = [f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(meta[k]) for k in keys if k in meta))
    return {"eos_token_id": eos, **chat_settings(meta.get("tokenizer.chat_template"))}
