"""Group-wise int8/int4 weights laid out for compiled decode loops on CPU: outputs side by side, in tiles.

llama.cpp's block layout (llama_gen.fast.groupwise) keeps each output's groups together, so a product with a few
rows reduces along the inputs, one output at a time. Inductor writes such loops with scalar code for packed
weights (the fp16 scales and the nibble order break its vectorization: ~1.4 ms per 3072x576 weight, more than
float32's 0.1 ms). Transposed, the same product is a sum of pointwise terms vectorized along the outputs:

* The outputs are cut into tiles of ``T`` side by side; ``qweight`` is ``[out / T, in, T]`` int8 (the signed
  values themselves) or ``[out / T, in / 8, T]`` int32 words (int4: word ``[t, k, n]`` holds inputs ``8k .. 8k +
  7`` of output ``t T + n``, input ``8k + l`` in bits ``4l ..``, values 0..15); ``scales`` and (int4) ``mins``
  fp16 ``[out / T, groups, T]``. A tile's weights are one contiguous run: a loop over a tile reads memory in
  order, where columns of the whole width made it read 32 (int8) or 4 (int4) rows far apart at once.
* For each group g, ``part[g, n] = sum_i value[g, i, n] * x[g, i]`` and ``y[n] = sum_g part[g, n] * scale[g, n]
  (+ min[g, n] * sum_i x[g, i] for int4)``: the same products as ``x @ W`` in float32, summed in another order
  (differences ~1e-6 relative).
* Tiles of TILE (16: one AVX-512 vector) outputs. int8 as plain bytes Inductor loads and converts 16 at a time;
  int4 in 32-bit words, a word's lane masked in place, not shifted down: ``words & (15 << 4 l)`` is the value
  times ``2**(4 l)``, exactly, and is multiplied by ``x * 2**-(4 l)`` (computed once per row; powers of two scale
  exactly; the top lane is shifted: its bit 31 is int32's sign).
* The rows are a dimension of the loops, not unrolled: a tile is read once for all rows (loop_columns_linear).

Measured (AMD EPYC, AVX-512, 2 threads, all linears of a default-model step; benchmarks/RESULTS.md): int8 one row
5.3 ms tiled, 7.2 as untiled bytes, 10.3 as untiled words of four; int4 one row 5.9 tiled, 6.8 untiled; 8 rows
with the rows a loop dimension: int8 16.5 ms, int4 15.9, unrolled 18.4 / 18.9 (and 4x longer to compile).
Prompts (more rows than the loops take, or eager calls) dequantize the weight into ``[in, out]``, CHUNK outputs at a
time, and run the library's matmul.
"""

from collections.abc import Callable

import torch
from torch import nn

from llama_gen.fast.gemv import uses_loops
from llama_gen.fast.groupwise import CHUNK, QuantEmbedding, QuantLinear, product_in_chunks, unpack_int4
from llama_gen.fast.memory import replace_modules

# Outputs converted or dequantized at a time (groupwise.CHUNK): a prompt's peak resident memory (default model,
# q4_1, 512 tokens) was 350 MiB with 4096, 302 with 1024, equally fast.
TILE = 16  # int8 outputs per tile: one AVX-512 vector of float32 (tiles of 32 or 64 measured slower)


def _column_words(values: torch.Tensor) -> torch.Tensor:
    """Returns int32 words ``[in / 8, out]`` of 4-bit values ``[out, in]`` (0 .. 15)."""
    v = values.to(torch.int64).view(values.shape[0], -1, 8)
    words = v[..., 0].clone()
    for lane in range(1, 8):
        words |= v[..., lane] << (4 * lane)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as int32
    return words.to(torch.int32).t()


def tile_width(out_features: int) -> int:
    """Returns how many outputs a tile holds: TILE, or all of them where they are no multiple of TILE."""
    return TILE if out_features % TILE == 0 else out_features


def _tiled(columns: torch.Tensor, width: int) -> torch.Tensor:
    """Returns ``[n, out]`` as tiles ``[out / width, n, width]`` (a copy)."""
    return columns.view(columns.shape[0], -1, width).transpose(0, 1).contiguous()


def to_columns(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (qweight, scales, mins) in the tiled column layout of a weight in llama.cpp's block layout."""
    out_features, bits = qweight.shape[0], 8 if mins is None else 4
    width = tile_width(out_features)
    rows_per_output = qweight.shape[1] if bits == 8 else qweight.shape[1] // 4
    tiles = torch.empty(out_features // width, rows_per_output, width, dtype=torch.int8 if bits == 8 else torch.int32)
    for start in range(0, out_features, CHUNK):  # small temporaries (int4: int64 words)
        rows = qweight[start : start + CHUNK]
        columns = rows.t() if bits == 8 else _column_words(unpack_int4(rows))
        if width == out_features:
            tiles[0, :, start : start + CHUNK] = columns
        else:
            tiles[start // width : (start + CHUNK) // width] = _tiled(columns, width)
    return tiles, _tiled(scales.t(), width), None if mins is None else _tiled(mins.t(), width)


def in_features_of(qweight: torch.Tensor) -> int:
    """Returns the inputs of a tiled column-layout weight: one per int8, eight per int32 word."""
    return qweight.shape[1] * (8 if qweight.dtype == torch.int32 else 1)


def _lane(words: torch.Tensor, lane: int) -> torch.Tensor:
    """Returns 4-bit lane ``lane`` of the words as float32, times ``2**(4 * lane)`` except for the top lane."""
    if lane == 7:
        return ((words >> 28) & 15).float()
    return (words & (15 << (4 * lane))).float()


def _lane_inputs(x: torch.Tensor) -> torch.Tensor:
    """Returns x ``[..., 8]`` with each lane's inputs scaled to match the masked lanes (_lane)."""
    scales = [2.0 ** -(4 * lane) for lane in range(7)] + [1.0]  # Python floats: no tensor constant
    return torch.stack([x[..., lane] * scale for lane, scale in enumerate(scales)], -1)


def _sum_of_products(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Returns ``sum(a.float() * b for a, b in terms)``, written as one pointwise sum the compiler fuses."""
    part = None
    for a, b in terms:
        term = a.float() * b
        part = term if part is None else part + term
    return part


def loop_columns_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> torch.Tensor:
    """Returns ``x @ W`` for a weight W in the tiled column layout (see the module docstring), written as loops,
    in x's dtype.

    The rows are a dimension of the loops (``[tiles, rows, groups, width]``, reduced over the groups), not unrolled
    into the loop body: a tile is read from memory once and from L1 for its other rows, and the body stays the same
    size for any number of rows (8 rows unrolled compiled 4x slower and ran ~15 % slower, benchmarks/RESULTS.md).
    """
    n_tiles, n_groups, width = scales.shape
    in_features = in_features_of(qweight)
    group = in_features // n_groups
    flat = x.reshape(-1, n_groups, group).float()  # [rows, groups, group]
    if mins is None:  # int8: input i of every group, for every tile: [tiles, 1, groups, width]
        values = qweight.view(n_tiles, 1, n_groups, group, width)
        terms = [(values[..., i, :], flat[None, :, :, i, None]) for i in range(group)]
        part = _sum_of_products(terms) * scales[:, None].float()
    else:  # int4: word j of every group, each of its 8 lanes
        scaled = _lane_inputs(flat.view(flat.shape[0], n_groups, group // 8, 8))
        words = qweight.view(n_tiles, 1, n_groups, group // 8, width)
        terms = [
            (_lane(words[..., j, :], lane), scaled[None, :, :, j, lane, None])
            for j in range(group // 8)
            for lane in range(8)
        ]
        sums = flat.sum(-1)[None, :, :, None]  # [1, rows, groups, 1]
        part = _sum_of_products(terms) * scales[:, None].float() + mins[:, None].float() * sums
    out = part.sum(2).transpose(0, 1)  # [rows, tiles, width]
    return out.reshape(*x.shape[:-1], n_tiles * width).to(x.dtype)


def _untiled(tiles: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Returns the columns ``[n, len(outputs)]`` of these outputs (ids) from tiles ``[out / width, n, width]``."""
    width = tiles.shape[2]
    return tiles[outputs // width, :, outputs % width].t()


def _tile_columns(tiles: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Returns the columns ``[n, outputs]`` of tiles first .. last - 1, their outputs in order."""
    part = tiles[first:last]
    return part.permute(1, 0, 2).reshape(part.shape[1], -1)


def _dequantize(
    columns: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Returns the weight ``[in, outputs]`` of columns ``[n, outputs]`` with their scales (and int4 minimums)
    ``[groups, outputs]``, in dtype (float32 arithmetic)."""
    n_groups, outputs = scale.shape
    if low is None:
        values = columns.reshape(n_groups, -1, outputs).float()
        return (values * scale.float()[:, None]).view(-1, outputs).to(dtype)
    values = torch.stack([(columns >> (4 * lane)) & 15 for lane in range(8)], 1)  # [in / 8, 8, outputs]
    values = values.view(n_groups, -1, outputs).float()
    return (values * scale.float()[:, None] + low.float()[:, None]).view(-1, outputs).to(dtype)


def dequantize_outputs(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, outputs: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Returns the weight ``[in, len(outputs)]`` of the chosen outputs only (ids), in dtype (float32 arithmetic)."""
    low = None if mins is None else _untiled(mins, outputs)
    return _dequantize(_untiled(qweight, outputs), _untiled(scales, outputs), low, dtype)


def dequantize_tiles(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, first: int, last: int, dtype: torch.dtype
) -> torch.Tensor:
    """Returns the weight ``[in, outputs]`` of tiles first .. last - 1 (slices: no index arithmetic), in dtype."""
    low = None if mins is None else _tile_columns(mins, first, last)
    return _dequantize(_tile_columns(qweight, first, last), _tile_columns(scales, first, last), low, dtype)


def dequantize_columns(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Returns the whole weight ``[in, out]`` of a tiled column layout, in dtype."""
    return dequantize_tiles(qweight, scales, mins, 0, scales.shape[0], dtype)


class ColumnQuantLinear(nn.Module):
    """A bias-free group-wise int8/int4 linear layer in the column layout (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, max_rows: int):
        super().__init__()
        self.bits = 8 if mins is None else 4
        self.in_features, self.out_features = in_features_of(qweight), qweight.shape[0] * qweight.shape[2]
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("mins", mins, persistent=False)
        self.max_rows = max_rows  # compiled products of up to this many rows run as loops

    @classmethod
    def from_blocks(cls, layer: QuantLinear, max_rows: int) -> "ColumnQuantLinear":
        return cls(*to_columns(layer.qweight, layer.scales, layer.mins), max_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_loops(x, self.in_features, self.max_rows):
            return loop_columns_linear(x, self.qweight, self.scales, self.mins)
        width = self.scales.shape[2]
        return product_in_chunks(x, self.out_features, max(1, CHUNK // width) * width, self.dequantized_product(x))

    def dequantized_product(self, x: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """Returns ``(start, stop) -> x @ W[:, start:stop]`` on the dequantized tiles of outputs start .. stop - 1."""
        tensors, width = (self.qweight, self.scales, self.mins), self.scales.shape[2]
        return lambda start, stop: x @ dequantize_tiles(*tensors, start // width, stop // width, x.dtype)

    def extra_repr(self) -> str:
        group = self.in_features // self.scales.shape[1]
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int{self.bits}, group {group}, columns in tiles of {self.scales.shape[2]}"


class ColumnQuantEmbedding(nn.Module):
    """A token embedding read from a tied output layer's column layout (one copy of the table in memory)."""

    def __init__(self, output: ColumnQuantLinear, dtype: torch.dtype):
        super().__init__()
        for name in ("qweight", "scales", "mins"):  # the same tensors, as tied parameters are
            self.register_buffer(name, getattr(output, name), persistent=False)
        self.dim = output.in_features
        self.dtype = dtype  # the activations'

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1)
        weight = dequantize_outputs(self.qweight, self.scales, self.mins, ids, self.dtype)  # [dim, tokens]
        return weight.t().reshape(*tokens.shape, self.dim)


def use_column_layers(model: nn.Module, max_rows: int) -> None:
    """Replaces every group-wise QuantLinear by its ColumnQuantLinear (in place), running loops for up to max_rows
    rows; an embedding tied to the output layer (sharing its tensors) then reads the output's columns."""
    tied = isinstance(model.tok_embeddings, QuantEmbedding) and isinstance(model.output, QuantLinear)
    tied = tied and model.tok_embeddings.qweight is model.output.qweight
    replace_modules(model, lambda m: type(m) is QuantLinear, lambda m: ColumnQuantLinear.from_blocks(m, max_rows))
    if tied:
        model.tok_embeddings = ColumnQuantEmbedding(model.output, model.tok_embeddings.dtype)
