"""What every conversion writes: a Meta-style checkpoint directory (params.json, consolidated.00.pth in Meta's
tensor names and shapes, generation_config.json) in the dtype asked for."""

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llama_gen.devices import resolve_dtype

CHECKPOINT_FILES = ("params.json", "consolidated.00.pth", "generation_config.json")

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
    "attention.wq.bias": ("self_attn.q_proj.bias", "attn_q.bias"),  # only in qkv_bias models (Qwen2)
    "attention.wk.bias": ("self_attn.k_proj.bias", "attn_k.bias"),
    "attention.wv.bias": ("self_attn.v_proj.bias", "attn_v.bias"),
}
GLOBAL_TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "output.weight": ("lm_head.weight", "output.weight"),
}
HF, GGUF = 0, 1  # which column of the tables above a source format uses


def checkpoint_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Returns the torch dtype named by ``dtype`` (a name of llama_gen.devices.DTYPES); raises ValueError listing
    the valid names otherwise."""
    # A checkpoint's dtype does not depend on a device; resolve_dtype only consults the device for a None dtype.
    return resolve_dtype(dtype, torch.device("cpu"))


def meta_names(n_layers: int, source: int, layer_prefix: str) -> dict[str, str]:
    """Returns a map from a source format's tensor names to Meta tensor names.

    ``source`` is HF or GGUF; ``layer_prefix`` spells layer i's prefix with ``{i}`` (e.g. ``"blk.{i}."``).
    """
    names = {columns[source]: meta for meta, columns in GLOBAL_TENSORS.items()}
    for i in range(n_layers):
        prefix = layer_prefix.format(i=i)
        names.update({prefix + columns[source]: f"layers.{i}.{meta}" for meta, columns in LAYER_TENSORS.items()})
    return names


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


def meta_params(
    shape: dict[str, int],
    ffn_hidden: int,
    norm_eps: float,
    rope_theta: float,
    rope_scaling: dict[str, Any] | None,
    qkv_bias: bool = False,
) -> dict[str, Any]:
    """Returns params.json contents: ``shape`` gives dim, n_layers, n_heads, n_kv_heads and vocab_size; the SwiGLU
    hidden size is written as Meta's multiple_of / ffn_dim_multiplier; ``qkv_bias`` (Qwen2) is written only when
    set."""
    multiple_of, multiplier = ffn_params(shape["dim"], ffn_hidden)
    sizes = {key: shape[key] for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    return {
        **sizes,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        **({"qkv_bias": True} if qkv_bias else {}),
    }


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
    if params.get("qkv_bias"):
        kv = (n_kv * head_dim,)
        layer.update({"attention.wq.bias": (n_heads * head_dim,), "attention.wk.bias": kv, "attention.wv.bias": kv})
    for i in range(params["n_layers"]):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def build_state_dict(
    tensors: Iterator[tuple[str, torch.Tensor]], params: dict[str, Any], dtype: torch.dtype, source: Path, tied: bool
) -> dict[str, torch.Tensor]:
    """Returns the Meta state dict built from (meta_name, tensor) pairs: cast to ``dtype``, shape-checked.

    With ``tied`` embeddings and no output tensor in the source, ``output.weight`` is a copy of the embedding.
    """
    shapes = expected_shapes(params)
    state: dict[str, torch.Tensor] = {}
    total = len(shapes) - tied  # a tied source stores no output tensor
    for name, tensor in tqdm(tensors, total=total, desc=f"converting {source.name}", unit="tensor", file=sys.stderr):
        if name not in shapes:
            raise ValueError(f"{source}: tensor {name} is not part of a Llama model with these params")
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
        state[name] = tensor.to(dtype).contiguous()
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


def is_checkpoint(path: Path) -> bool:
    """Returns whether ``path`` holds a complete converted checkpoint."""
    return all((path / name).is_file() for name in CHECKPOINT_FILES) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    )
