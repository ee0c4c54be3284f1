"""Every load-time change to a model's weights, and the one choice of kernels they are made for.

``choose_layout`` decides once, at load time, from the model's dtype, its largest batch and the CPU
(llama_gen.fast.cpu; measured, benchmarks/RESULTS.md), everything the layers need: int8 weights or not, the
layout of the float weights ("packed": oneDNN-packed, llama_gen.fast.packed; "gemv": plain, compiled into
Inductor's own loops, llama_gen.fast.gemv; "plain": library kernels), up to how many rows the loops run, and
whether group-wise int4 layers run PyTorch's int4 kernel (bf16 models, llama_gen.fast.int4pack). The
decision is a ``Layout``; ``apply_layout`` carries it out, in this process and in the child process that builds
the decode step ahead of time (llama_gen.fast.aot, which receives it as JSON). The layers are given their
part of it when they are built and never ask the CPU themselves.
"""

import sys
from dataclasses import dataclass

import torch
from torch import nn

from llama_gen.checkpoint import release_freed_memory, release_pages
from llama_gen.devices import DTYPES, has_native_bf16_matmul
from llama_gen.fast.columns import use_column_layers
from llama_gen.fast.cpu import mkl_gemv_is_fastest
from llama_gen.fast.gemv import use_gemv_linears
from llama_gen.fast.groupwise import QuantLinear
from llama_gen.fast.int4pack import use_int4pack_layers
from llama_gen.fast.packed import pack_linears
from llama_gen.fast.quantize import (
    Int8Kernels,
    Int8Linear,
    check_quantization,
    model_scheme,
    parse_scheme,
    scheme_string,
    share_tied_output,
)
from llama_gen.fast.quantize import quantize as quantize_model
from llama_gen.model import Transformer

MAX_ROWS = 8  # loops up to this many rows; more: a matmul kernel does better (and the loop body grows every row)
# bf16 where the CPU has native bf16 matmuls: all linears of a default-model step (AVX512-BF16 AMD EPYC) take
# 11.7 / 15.6 / 26.6 ms as loops at 2 / 4 / 8 rows and 24.6 / 23.2 / 23.9 ms with oneDNN's kernel.
NATIVE_BF16_MAX_ROWS = 4
# int8's loop body is four times longer per row: at 8 rows the default model took 8 minutes to compile and ran
# no faster end to end than the int8 kernel (batch 8: 181 vs 178 tok/s); at one row the loops are ~2x faster.
INT8_MAX_ROWS = 1


@dataclass(frozen=True)
class Layout:
    """How the fast path keeps a model's weights and which kernels its layers run (made by choose_layout)."""

    quantize: str | None  # "int8", a group-wise scheme (per kind: llama_gen.fast.quantize), or None: float weights
    weights: str  # the float weights' layout: "packed", "gemv" or "plain" (cpu_weight_layout)
    gemv_rows: int  # GemvLinear: compiled products of up to this many rows run as loops
    int8: Int8Kernels  # what Int8Linear multiplies with
    columns_rows: int = 0  # group-wise layers: in the column layout, loops for up to this many rows (0: block layout)
    int4pack: bool = False  # group-wise int4 layers on PyTorch's int4 kernel (llama_gen.fast.int4pack)

    def to_json(self) -> dict:
        """Returns the layout as JSON values (for the child process that builds the step, and its cache key)."""
        int8 = {"prompt_dtype": str(self.int8.prompt_dtype).removeprefix("torch."), "loop_rows": self.int8.loop_rows}
        return {
            "quantize": self.quantize, "weights": self.weights, "gemv_rows": self.gemv_rows, "int8": int8,
            "columns_rows": self.columns_rows, "int4pack": self.int4pack,
        }  # fmt: skip

    @classmethod
    def from_json(cls, values: dict) -> "Layout":
        """Returns the layout that to_json described."""
        int8 = Int8Kernels(DTYPES[values["int8"]["prompt_dtype"]], values["int8"]["loop_rows"])
        rest = values["columns_rows"], values["int4pack"]
        return cls(values["quantize"], values["weights"], values["gemv_rows"], int8, *rest)


# ---- the choice -----------------------------------------------------------------------------------------


def gemv_max_rows(dtype: torch.dtype) -> int:
    """Returns up to how many rows a product with a float weight of this dtype runs as loops in compiled code."""
    return NATIVE_BF16_MAX_ROWS if dtype == torch.bfloat16 and has_native_bf16_matmul() else MAX_ROWS


def int8_kernels() -> Int8Kernels:
    """Returns what int8 layers multiply with on this CPU: prompts dequantized to bf16 where bf16 matmuls are
    native, else to float32; loops for up to INT8_MAX_ROWS rows (they read the weight as little-endian words)."""
    prompt_dtype = torch.bfloat16 if has_native_bf16_matmul() else torch.float32
    return Int8Kernels(prompt_dtype, loop_rows=INT8_MAX_ROWS if sys.byteorder == "little" else 0)


def uses_int4pack(model: Transformer) -> bool:
    """True when this model's group-wise int4 layers run PyTorch's CPU int4 kernel: a bf16 model on a CPU with
    native bf16 matmuls (the kernel's fast code is AVX-512 bf16; all linears of a default-model step took ~3 / ~10 ms
    at 1 / 8 rows against ~3.8 / ~16 ms for the float32 loops of llama_gen.fast.columns)."""
    weight = model.norm.weight
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and has_native_bf16_matmul()


def cpu_weight_layout(model: Transformer) -> str:
    """Returns how the compiled fast path keeps this model's float weights: "packed", "gemv" or "plain".

    From the dtype, the largest batch and the CPU, as measured (benchmarks/RESULTS.md). bf16 where the CPU has
    native bf16 matmuls: gemv up to NATIVE_BF16_MAX_ROWS rows, packed for larger batches (oneDNN's kernel on
    plain weights repacks each weight on every call); without them, gemv. float32 on Intel CPUs stays plain at
    batch 1 (MKL's matrix-vector kernel beats the packed one by ~25%) and is packed for batches; elsewhere it is
    gemv up to MAX_ROWS rows (1 row: ~2x MKL's generic path, ~1.6x packed; 8 rows: ~1.3x packed) and packed
    beyond.
    """
    dtype = model.norm.weight.dtype
    if model.norm.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return "plain"
    if dtype == torch.bfloat16:
        return "packed" if has_native_bf16_matmul() and model.args.max_batch_size > NATIVE_BF16_MAX_ROWS else "gemv"
    if mkl_gemv_is_fastest():
        return "packed" if model.args.max_batch_size > 1 else "plain"
    return "gemv" if model.args.max_batch_size <= MAX_ROWS else "packed"


def choose_layout(model: Transformer, compile: bool, quantize: str | None) -> Layout:
    """Returns the layout to prepare this model with: its quantization (asked for, or the one a quantized checkpoint
    came with), the CPU weight layout when the step is compiled (eager code runs the library kernels: "plain"),
    and the loop rows and int8 kernels for its dtype and this CPU."""
    check_quantization(quantize)
    loaded = model_scheme(model)
    if loaded is not None and quantize is not None:
        raise ValueError(f"the checkpoint is already quantized ({loaded}): load it without --quantize {quantize}")
    if quantize is not None and quantize != "int8":
        quantize = scheme_string(parse_scheme(quantize))  # the per-kind form: what the layers are built from
    weights = cpu_weight_layout(model) if compile else "plain"
    word_loops = model.norm.weight.device.type == "cpu" and sys.byteorder == "little"  # they read 32-bit words
    columns_rows = MAX_ROWS if compile and word_loops else 0
    dtype = model.norm.weight.dtype
    return Layout(loaded or quantize, weights, gemv_max_rows(dtype), int8_kernels(), columns_rows, uses_int4pack(model))


# ---- carrying it out ------------------------------------------------------------------------------------


def fused_linear(parts: list[nn.Module]) -> nn.Module | None:
    """Returns one linear layer computing ``torch.cat([p(x) for p in parts], -1)`` (biases concatenated too, when
    the parts have them: Qwen2's q/k/v), or None where the parts differ in kind (float and quantized ones)."""
    if all(isinstance(p, Int8Linear) for p in parts):
        return Int8Linear.concat(parts)
    if isinstance(parts[0], QuantLinear) and all(parts[0].fuses_with(p) for p in parts):
        fused = QuantLinear.concat(parts)
        for tensor in [t for p in parts for t in p.buffers()]:
            release_pages(tensor)
        return fused
    if not all(type(p) is nn.Linear for p in parts):
        return None
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    for p in parts:
        release_pages(p.weight)
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def can_fuse(model: Transformer) -> bool:
    """Fusion needs plain (or int8) linear layers, not fairscale's model-parallel ones."""
    attn = model.layers[0].attention
    plain = (nn.Linear, Int8Linear, QuantLinear)
    return attn.wqkv is not None or all(type(getattr(attn, name)) in plain for name in ("wq", "wk", "wv"))


def fuse_projections(model: Transformer) -> Transformer:
    """Replaces wq/wk/wv by ``wqkv`` and w1/w3 by ``w13`` in every layer (in place); returns the model.

    One matmul for q, k and v and one for w1 and w3, each reading one larger weight. Done after the checkpoint
    is loaded: the checkpoint format does not change.
    """
    if not can_fuse(model):
        raise ValueError("projection fusion needs plain nn.Linear layers (model_parallel_size=1)")
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        if attn.wqkv is None and (fused := fused_linear([attn.wq, attn.wk, attn.wv])) is not None:
            attn.wqkv = fused
            del attn.wq, attn.wk, attn.wv
        if ff.w13 is None and (fused := fused_linear([ff.w1, ff.w3])) is not None:
            ff.w13 = fused
            del ff.w1, ff.w3
        release_freed_memory()  # this layer's unfused weights, before the next layer's fused copies
    return model


def apply_layout(model: Transformer, layout: Layout) -> None:
    """Applies the load-time weight changes in place: int8 weights (each float weight's pages dropped as it is
    replaced; a tied output layer sharing the embedding's), fused projections, then the weights' layouts."""
    quantize_model(model, layout.quantize, layout.int8)
    share_tied_output(model)
    fuse_projections(model)
    if layout.int4pack:
        use_int4pack_layers(model)
    if layout.columns_rows:
        use_column_layers(model, layout.columns_rows)
    if layout.weights == "packed":
        pack_linears(model, batch_size=model.args.max_batch_size)
    elif layout.weights == "gemv":
        use_gemv_linears(model, layout.gemv_rows)
