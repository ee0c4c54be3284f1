"""Group-wise int8/int4 weights laid out for compiled decode loops on CPU: columns of 32-bit words.

llama.cpp's block layout (llama_gen.fast.groupwise) keeps each output's groups together, so a product with a few
rows reduces along the inputs, one output at a time. Inductor writes such loops with scalar code for packed
weights (the fp16 scales and the nibble order break its vectorization: ~1.4 ms per 3072x576 weight, more than
float32's 0.1 ms). Transposed, the same product is a sum of pointwise terms vectorized along the outputs:

* ``words`` int32 ``[in / lanes, out]``: word ``[k, n]`` holds inputs ``lanes * k .. lanes * k + lanes - 1`` of
  output n, input ``lanes * k + l`` in bits ``bits * l ..`` (int4: 8 lanes of 0..15; int8: 4 lanes of the value
  plus 128, 0..255); ``scales`` and (int4) ``mins`` fp16 ``[groups, out]``.
* For each group g, ``part[g, n] = sum_i value[g, i, n] * x[g, i]`` and ``y[n] = sum_g part[g, n] * scale[g, n]
  + zero[g, n] * sum_i x[g, i]``, where ``zero`` is the minimum (int4) or ``-128 * scale`` (int8): the same
  products as ``x @ W`` in float32, summed in another order (differences ~1e-6 relative).
* A lane is masked in place, not shifted down: ``words & (15 << 4 l)`` is the value times ``2**(4 l)``, exactly,
  and is multiplied by ``x * 2**-(4 l)`` (computed once per row; powers of two scale exactly). The top lane is
  shifted (its bit 31 is int32's sign).

Measured (AMD EPYC, AVX-512, 2 threads; benchmarks/RESULTS.md): see there. Prompts (more rows than the loops
take, or eager calls) dequantize the weight into ``[in, out]`` and run the library's matmul.
"""

import torch
from torch import nn

from llama_gen.fast.gemv import uses_loops
from llama_gen.fast.groupwise import QuantEmbedding, QuantLinear, unpack_int4
from llama_gen.fast.memory import replace_modules

CHUNK = 4096  # outputs converted at a time (small int32 temporaries: the output layer has 49,152 of them)


def _column_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Returns int32 words ``[in / lanes, out]`` of unsigned values ``[out, in]`` (0 .. 2**bits - 1)."""
    lanes = 32 // bits
    v = values.to(torch.int64).view(values.shape[0], -1, lanes)
    words = v[..., 0].clone()
    for lane in range(1, lanes):
        words |= v[..., lane] << (bits * lane)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as int32
    return words.to(torch.int32).t()


def to_columns(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (words, scales, mins) in the column layout of a weight in llama.cpp's block layout."""
    bits = 8 if mins is None else 4
    out_features = qweight.shape[0]
    words = torch.empty(qweight.shape[1] * qweight.element_size() // 4, out_features, dtype=torch.int32)
    for start in range(0, out_features, CHUNK):
        rows = qweight[start : start + CHUNK]
        values = unpack_int4(rows) if bits == 4 else rows.to(torch.int32) + 128
        words[:, start : start + CHUNK] = _column_words(values, bits)
    return words, scales.t().contiguous(), None if mins is None else mins.t().contiguous()


def _lane(words: torch.Tensor, lane: int, bits: int) -> torch.Tensor:
    """Returns lane ``lane`` of the words as float32, times ``2**(bits * lane)`` except for the top lane."""
    mask = (1 << bits) - 1
    if lane == 32 // bits - 1:
        return ((words >> (32 - bits)) & mask).float()
    return (words & (mask << (bits * lane))).float()


def _lane_inputs(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Returns x ``[..., lanes]`` with each lane's inputs scaled to match the masked lanes (_lane)."""
    lanes = 32 // bits
    scales = [2.0 ** -(bits * lane) for lane in range(lanes - 1)] + [1.0]  # Python floats: no tensor constant
    return torch.stack([x[..., lane] * scale for lane, scale in enumerate(scales)], -1)


def loop_columns_linear(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> torch.Tensor:
    """Returns ``x @ W`` for a weight W in the column layout (see the module docstring), written as loops, in
    x's dtype."""
    bits = 8 if mins is None else 4
    lanes = 32 // bits
    n_groups, out_features = scales.shape
    in_features = words.shape[0] * lanes
    group = in_features // n_groups
    flat = x.reshape(-1, in_features).float().contiguous().view(-1, n_groups, group)
    sums = flat.sum(-1)  # [rows, groups]
    scaled = _lane_inputs(flat.view(-1, n_groups, group // lanes, lanes), bits).contiguous()
    per_group = words.view(n_groups, group // lanes, out_features).unbind(1)  # word j of every group: [groups, out]
    values = [[_lane(w, lane, bits) for lane in range(lanes)] for w in per_group]
    scale, zero = scales.float(), _zeros(scales, mins)
    outs = []
    for r in range(flat.shape[0]):
        part = None
        for j, word_lanes in enumerate(values):
            for lane, value in enumerate(word_lanes):
                term = value * scaled[r, :, j, lane, None]
                part = term if part is None else part + term
        outs.append((part * scale + zero * sums[r, :, None]).sum(0))
    return torch.stack(outs).reshape(*x.shape[:-1], out_features).to(x.dtype)


def dequantize_columns(
    words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Returns the weight ``[in, out]`` (float32 arithmetic, then dtype) of a column layout."""
    bits = 8 if mins is None else 4
    lanes, mask = 32 // bits, (1 << bits) - 1
    values = torch.stack([(words >> (bits * lane)) & mask for lane in range(lanes)], 1)  # [in / lanes, lanes, out]
    n_groups, out_features = scales.shape
    values = values.view(n_groups, -1, out_features).float()
    return (values * scales.float()[:, None] + _zeros(scales, mins)[:, None]).view(-1, out_features).to(dtype)


def dequantize_outputs(
    words: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    outputs: slice | torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Returns the weight ``[in, len(outputs)]`` of the chosen outputs only (a slice, or ids), in dtype."""
    return dequantize_columns(words[:, outputs], scales[:, outputs], None if mins is None else mins[:, outputs], dtype)


def _zeros(scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """Returns, in float32, what a stored value of 0 stands for per group: the minimum (int4), -128 scales (int8)."""
    return -128 * scales.float() if mins is None else mins.float()


class ColumnQuantLinear(nn.Module):
    """A bias-free group-wise int8/int4 linear layer in the column layout (see the module docstring)."""

    def __init__(self, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, max_rows: int):
        super().__init__()
        self.bits = 8 if mins is None else 4
        self.in_features, self.out_features = words.shape[0] * 32 // self.bits, words.shape[1]
        self.register_buffer("words", words, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("mins", mins, persistent=False)
        self.max_rows = max_rows  # compiled products of up to this many rows run as loops

    @classmethod
    def from_blocks(cls, layer: QuantLinear, max_rows: int) -> "ColumnQuantLinear":
        return cls(*to_columns(layer.qweight, layer.scales, layer.mins), max_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_loops(x, self.in_features, self.max_rows):
            return loop_columns_linear(x, self.words, self.scales, self.mins)
        # in slices of CHUNK outputs: a prompt through a large output layer never holds its whole float weight
        tensors = (self.words, self.scales, self.mins)
        starts = range(0, self.out_features, CHUNK)
        return torch.cat([x @ dequantize_outputs(*tensors, slice(s, s + CHUNK), x.dtype) for s in starts], -1)

    def extra_repr(self) -> str:
        group = self.in_features // self.scales.shape[0]
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int{self.bits}, group {group}, columns"


class ColumnQuantEmbedding(nn.Module):
    """A token embedding read from a tied output layer's column layout (one copy of the table in memory)."""

    def __init__(self, output: ColumnQuantLinear, dtype: torch.dtype):
        super().__init__()
        for name in ("words", "scales", "mins"):  # the same tensors, as tied parameters are
            self.register_buffer(name, getattr(output, name), persistent=False)
        self.dim = output.in_features
        self.dtype = dtype  # the activations'

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = dequantize_outputs(self.words, self.scales, self.mins, tokens.reshape(-1), self.dtype)  # [dim, tokens]
        return weight.t().reshape(*tokens.shape, self.dim)


def use_column_layers(model: nn.Module, max_rows: int) -> None:
    """Replaces every group-wise QuantLinear by its ColumnQuantLinear (in place), running loops for up to max_rows
    rows; an embedding tied to the output layer (sharing its tensors) then reads the output's columns."""
    tied = isinstance(model.tok_embeddings, QuantEmbedding) and isinstance(model.output, QuantLinear)
    tied = tied and model.tok_embeddings.qweight is model.output.qweight
    replace_modules(model, lambda m: type(m) is QuantLinear, lambda m: ColumnQuantLinear.from_blocks(m, max_rows))
    if tied:
        model.tok_embeddings = ColumnQuantEmbedding(model.output, model.tok_embeddings.dtype)
