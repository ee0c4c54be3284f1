"""Group-wise weight-only quantization in llama.cpp's block layout: int8 (Q8_0-like) and int4 (Q4_1-like).

A weight ``[out, in]`` is cut along ``in`` into groups of ``group`` values (32, 64 or 128); every group has its own
fp16 scale ``s`` (and, for int4, fp16 minimum ``m``):

* int8: int8 values ``q [out, in]`` and scales ``[out, in / group]``; ``w = q * s`` (symmetric, q in -127..127).
  With groups of 32 this is llama.cpp's Q8_0, value for value.
* int4: uint8 ``[out, in / 2]``, two values per byte in llama.cpp's order (each 32 values are 16 bytes; byte j holds
  value j in its low nibble and value j + 16 in its high one), scales and minimums ``[out, in / group]``;
  ``w = q * s + m`` with q in 0..15. With groups of 32 this is llama.cpp's Q4_1; its Q4_0 (``d * (q - 8)``) is
  ``s = d, m = -8 d``, exactly. A 32-value block is always contiguous, so larger groups are whole blocks.

Dequantizing computes each value in float32 as llama.cpp does (fp16 to float32, one product, one sum), so a GGUF
file's blocks (llama_gen.convert.gguf_blocks) give exactly its numbers. Matmuls: a step compiled on CPU converts
these layers into a column layout whose decode loops vectorize (llama_gen.fast.columns); in a bf16 model the int4
ones take PyTorch's own int4 kernel instead (llama_gen.fast.int4pack). Here, in compiled code
for up to ``max_rows`` rows, Inductor's own loops read the packed weight as 32-bit words and unpack, scale and
multiply in registers (llama_gen.fast.gemv.loop_lanes_linear); otherwise (prompts, eager calls, more rows) the
weight is dequantized into the activations' dtype and multiplied by the library's matmul. Kernel measurements:
benchmarks/RESULTS.md.

Quantized checkpoints store, for a layer ``NAME``, ``NAME.qweight``, ``NAME.scales`` and (int4) ``NAME.mins``
instead of ``NAME.weight``; the layers keep them as non-persistent buffers, so the model's ``state_dict`` and the
checkpoint's shape check see only the float tensors (norms and any layer kept in float).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llama_gen.fast.gemv import loop_lanes_linear, uses_loops

BLOCK = 32  # values per llama.cpp block: the smallest group and the unit of the int4 nibble order
GROUPS = (32, 64, 128)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Returns the uint8 values 0..15 ``[..., in]`` of int4 bytes ``[..., in / 2]`` in llama.cpp's nibble order."""
    blocks = packed.reshape(*packed.shape[:-1], -1, BLOCK // 2)
    values = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # low nibbles: values 0..15 of a block, high: 16..31
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Returns the int4 bytes ``[..., in / 2]`` of values 0..15 ``[..., in]`` (the inverse of unpack_int4)."""
    blocks = values.to(torch.uint8).reshape(*values.shape[:-1], -1, 2, BLOCK // 2)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*values.shape[:-1], values.shape[-1] // 2)


CHUNK = 1024  # outputs dequantized at a time for a prompt or an eager call (the output layer has 49,152)


def product_in_chunks(
    x: torch.Tensor, out_features: int, step: int, product: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """Returns x's ``out_features`` outputs, ``product(start, stop)`` computing outputs start .. stop - 1, ``step``
    at a time: the weight is only ever dequantized a chunk at a time (the default model's output layer in float32
    is 108 MiB).

    Each chunk goes straight into the output, allocated first: chunks kept until the end sat between the freed
    temporaries, and the C allocator could reuse none of that memory (a 512-token prompt's peak rose by up to
    100 MiB in the output layer, default model, bf16).
    """
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[..., start:stop] = product(start, stop)
    return out


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Returns the weight ``[..., in]`` (float32 arithmetic, then ``dtype``) of int8 or int4 values, group-wise scales
    ``[..., groups]`` and (int4) minimums."""
    q = qweight if mins is None else unpack_int4(qweight)
    groups = q.reshape(*q.shape[:-1], scales.shape[-1], -1).float() * scales.float()[..., None]
    if mins is not None:
        groups = groups + mins.float()[..., None]
    return groups.reshape(q.shape).to(dtype)


def quantize_groups(weight: torch.Tensor, bits: int, group: int, chunk_rows: int = 4096) -> tuple:
    """Returns (values, fp16 scales, fp16 minimums or None) of a float weight ``[out, in]``, group-wise.

    int8: ``s = max|w| / 127`` per group, ``q = round(w / s)``; int4: ``s = (max - min) / 15``, ``m = min``,
    ``q = round((w - m) / s)`` (llama.cpp's Q8_0 and Q4_1 rules). The values are rounded against the stored fp16
    scales and minimums, so dequantizing gives the nearest grid point. Rows go in chunks (small temporaries).
    """
    rows, cols = weight.shape
    n_groups = cols // group
    q = torch.empty(rows, cols // (8 // bits), dtype=torch.int8 if bits == 8 else torch.uint8, device=weight.device)
    scales = torch.empty(rows, n_groups, dtype=torch.float16, device=weight.device)
    mins = None if bits == 8 else torch.empty_like(scales)
    for start in range(0, rows, chunk_rows):
        w = weight[start : start + chunk_rows].detach().float().reshape(-1, n_groups, group)
        if bits == 8:
            s = (w.abs().amax(-1) / 127).to(torch.float16)
            values = torch.round(w / s.float()[..., None]).nan_to_num_(0).clamp_(-127, 127).to(torch.int8)
        else:
            low = w.amin(-1).to(torch.float16)
            s = ((w.amax(-1) - low.float()) / 15).to(torch.float16)
            values = torch.round((w - low.float()[..., None]) / s.float()[..., None]).nan_to_num_(0).clamp_(0, 15)
            mins[start : start + chunk_rows] = low
            values = pack_int4(values.reshape(w.shape[0], cols))
        if not torch.isfinite(s).all():
            raise ValueError(f"a weight [{rows}, {cols}] has values beyond fp16's range: it cannot be quantized")
        q[start : start + chunk_rows] = values.reshape(w.shape[0], -1)
        scales[start : start + chunk_rows] = s
    return q, scales, mins


def effective_group(in_features: int, group: int) -> int | None:
    """Returns the group size a layer of in_features inputs uses: ``group`` halved until it divides in_features
    (never below 32, a block), or None when in_features is no multiple of 32 (the layer stays in float)."""
    while group >= BLOCK:
        if in_features % group == 0:
            return group
        group //= 2
    return None


class QuantLinear(nn.Module):
    """A bias-free linear layer with a group-wise int8 or int4 weight (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, max_rows: int):
        super().__init__()
        self.bits = 8 if mins is None else 4
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * (8 // self.bits)
        self.group = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("mins", mins, persistent=False)
        self.max_rows = max_rows  # compiled products of up to this many rows run as loops

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int, max_rows: int) -> "QuantLinear":
        return cls(*quantize_groups(linear.weight, bits, group), max_rows)

    @classmethod
    def concat(cls, parts: list["QuantLinear"]) -> "QuantLinear":
        """Returns one layer computing ``torch.cat([p(x) for p in parts], -1)`` (groups run along rows)."""
        mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), mins, parts[0].max_rows)

    def fuses_with(self, other: nn.Module) -> bool:
        return isinstance(other, QuantLinear) and (other.bits, other.group) == (self.bits, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_loops(x, self.in_features, self.max_rows):
            return loop_lanes_linear(x, self.qweight, self.scales, self.mins)
        if torch.compiler.is_compiling():  # one product: the compiler fuses the dequantization and plans the memory
            return F.linear(x, dequantize(self.qweight, self.scales, self.mins, x.dtype))
        return product_in_chunks(x, self.out_features, CHUNK, self.dequantized_product(x))

    def dequantized_product(self, x: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """Returns ``(start, stop) -> x @ W[start:stop].T`` on the dequantized rows of outputs start .. stop - 1."""
        low = self.mins

        def product(start: int, stop: int) -> torch.Tensor:
            rows = (self.qweight[start:stop], self.scales[start:stop], None if low is None else low[start:stop])
            return F.linear(x, dequantize(*rows, x.dtype))

        return product

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group {self.group}"


class QuantEmbedding(nn.Module):
    """A token embedding whose rows are group-wise int8 or int4 (only the looked-up rows are dequantized)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.bits = 8 if mins is None else 4
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("mins", mins, persistent=False)
        self.dtype = dtype  # the activations'

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, group: int, dtype: torch.dtype) -> "QuantEmbedding":
        return cls(*quantize_groups(embedding.weight, bits, group), dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mins = None if self.mins is None else self.mins[tokens]
        return dequantize(self.qweight[tokens], self.scales[tokens], mins, self.dtype)

    def extra_repr(self) -> str:
        in_features = self.qweight.shape[1] * (8 // self.bits)
        return f"{self.qweight.shape[0]}, {in_features}, int{self.bits}, group {in_features // self.scales.shape[1]}"


def quantized_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Returns a quantized layer's checkpoint tensors by suffix (``qweight``, ``scales``, and ``mins`` for int4)."""
    names = ("qweight", "scales") if module.mins is None else ("qweight", "scales", "mins")
    return {name: getattr(module, name) for name in names}
