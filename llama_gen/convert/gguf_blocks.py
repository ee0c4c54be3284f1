"""GGUF Q8_0 / Q4_0 / Q4_1 tensors kept as they are: llama.cpp's blocks into a quantized checkpoint, never through
float, so the numbers are exactly llama.cpp's.

A block is 32 values of one row. Q8_0: fp16 scale ``d``, 32 int8 ``q``; ``w = d * q``. Q4_0: ``d``, 16 bytes of
nibbles; ``w = d * (q - 8)``. Q4_1: ``d``, fp16 minimum ``m``, 16 bytes; ``w = d * q + m``. Byte j of a block holds
value j in its low nibble and value j + 16 in its high one. These become the group-wise layers' tensors
(llama_gen.fast.groupwise, groups of 32): ``qweight`` (the int8 values, or the nibble bytes as they are),
``scales`` (``d``) and, for 4 bits, ``mins`` (``m``; Q4_0's is ``-8 d``, exact in fp16). The scheme is recorded
per kind of layer in params.json; every layer of a kind must have the same type, and tensors of any other type
(F32, F16, ...) are kept in float. An output layer tied to the embedding shares its tensors.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_gen.convert.meta_checkpoint import expected_shapes

BLOCK = 32
# GGML type name -> (bytes per block, bits, bytes of fp16 header: d, or d and m)
BLOCK_TYPES = {"Q8_0": (34, 8, 2), "Q4_0": (18, 4, 2), "Q4_1": (20, 4, 4)}
# scheme kinds (llama_gen.fast.quantize) -> Meta tensor name suffixes
KINDS = {
    "wq": "attention.wq.weight", "wk": "attention.wk.weight", "wv": "attention.wv.weight",
    "wo": "attention.wo.weight", "w1": "feed_forward.w1.weight", "w2": "feed_forward.w2.weight",
    "w3": "feed_forward.w3.weight", "output": "output.weight", "embedding": "tok_embeddings.weight",
}  # fmt: skip


def type_name(tensor: Any) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(tensor.tensor_type).name


def block_tensors(tensor: Any, src: Path) -> dict[str, torch.Tensor]:
    """Returns ``qweight``, ``scales`` (and for 4 bits ``mins``) of a Q8_0/Q4_0/Q4_1 GGUF tensor ``[rows, cols]``."""
    kind = type_name(tensor)
    block_bytes, bits, header = BLOCK_TYPES[kind]
    rows, cols = (int(d) for d in reversed(tensor.shape))
    raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
    if cols % BLOCK or raw.size != rows * cols // BLOCK * block_bytes:
        raise ValueError(f"{src}: tensor {tensor.name} ({kind}, {rows} x {cols}) has {raw.size} bytes: damaged file")
    blocks = raw.reshape(rows, cols // BLOCK, block_bytes)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    values = np.ascontiguousarray(blocks[..., header:]).reshape(rows, -1)
    out = {"qweight": values.view(np.int8) if bits == 8 else values, "scales": d}
    if bits == 4:  # Q4_0's d * (q - 8) is d * q + (-8 d)
        out["mins"] = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if kind == "Q4_1" else -8 * d
    return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in out.items()}


def layer_kind(name: str) -> str:
    """Returns the scheme kind of a Meta tensor name (or "" for norms)."""
    return next((kind for kind, suffix in KINDS.items() if name.endswith(suffix)), "")


def kind_schemes(types: dict[str, str], src: Path) -> dict[str, str]:
    """Returns each kind's format (``int4-g32``, ``int8-g32`` or ``float``) from the GGUF type of every Meta tensor,
    or raises when layers of one kind differ."""
    formats: dict[str, set[str]] = {}
    for name, kind_type in types.items():
        if layer_kind(name):
            fmt = f"int{BLOCK_TYPES[kind_type][1]}-g{BLOCK}" if kind_type in BLOCK_TYPES else "float"
            formats.setdefault(layer_kind(name), set()).add(fmt)
    mixed = {kind: sorted(f) for kind, f in formats.items() if len(f) > 1}
    if mixed:
        raise ValueError(
            f"{src}: layers of one kind have different tensor types ({mixed}); only uniform Q8_0/Q4_0/Q4_1 files "
            "keep their blocks: convert to float instead (without --keep_quantized)"
        )
    return {kind: formats.get(kind, {"float"}).pop() for kind in KINDS}


def blocks_state_dict(
    tensors: list[tuple[str, Any]], params: dict[str, Any], dtype: torch.dtype, src: Path, dequantize: Any
) -> tuple[dict[str, torch.Tensor], str]:
    """Returns the quantized checkpoint's tensors and its scheme (per-kind form) from (Meta name, GGUF tensor) pairs:
    blocks as they are, other tensors through ``dequantize`` (float, in ``dtype``)."""
    shapes = expected_shapes(params)
    types = {name: type_name(t) for name, t in tensors}
    schemes = kind_schemes(types, src)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shapes.get(name) != shape:
            raise ValueError(f"{src}: tensor {name} has shape {shape}, expected {shapes.get(name)}")
        if types[name] in BLOCK_TYPES:
            prefix = name.removesuffix(".weight")
            state.update({f"{prefix}.{k}": v for k, v in block_tensors(tensor, src).items()})
        else:
            state[name] = torch.from_numpy(dequantize(tensor, src)).to(dtype).contiguous()
    if "output.weight" not in types:  # tied: the output layer is the embedding
        schemes["output"] = schemes["embedding"]
        state.update(
            {k.replace("tok_embeddings.", "output.", 1): v for k, v in state.items() if "tok_embeddings." in k}
        )
    missing = [n for n in shapes if n not in state and f"{n.removesuffix('.weight')}.qweight" not in state]
    if missing:
        raise ValueError(f"{src}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state, ",".join(f"{kind}={fmt}" for kind, fmt in schemes.items())
