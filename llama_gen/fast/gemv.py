"""Matrix products for a few rows that ``torch.compile`` turns into its own loops, for decoding on CPU.

A decode step multiplies every weight by a few rows (one per sequence), so it is limited by how fast the
weights stream from memory. Where PyTorch's library kernels fall short of that (float32 on non-Intel CPUs,
where MKL takes a generic path; bf16 on CPUs without native bf16 matmuls, where the fallback kernel is
scalar; int8, whose kernel converts weights slower than memory delivers them on AVX2), writing the product as
a broadcast multiply and sum lets Inductor generate one vectorized loop per layer that reads each weight
element once for all rows, accumulating in float32. Measured on an AVX2 AMD EPYC (2 threads, all linears of a
SmolLM2-135M step, benchmarks/RESULTS.md): float32, 1 row, 18 ms vs 40 ms (MKL) and 24 ms (oneDNN-packed);
bf16, 8 rows, 42 ms vs 112 ms; int8, 1 row, 9 ms vs 19 ms (``_weight_int8pack_mm``).

Only compiled code takes this form; eager calls and prompts (many rows) use the library kernels. Up to how many
rows it pays is a property of the CPU, decided at load time (llama_gen.fast.layout) and given to each layer.
"""

import torch
import torch.nn.functional as F
from torch import nn

from llama_gen.fast.memory import replace_modules


def uses_loops(x: torch.Tensor, in_features: int, max_rows: int) -> bool:
    """True when a product of x (``[..., in_features]``) by a weight is written as loops: in compiled code, for
    up to max_rows rows.

    Asked on every call, and the only choice left to a call: one layer serves both prompts (eager, many rows:
    the library kernels) and decode steps (compiled, a few rows), and only the call knows which it is.
    """
    return torch.compiler.is_compiling() and x.numel() // in_features <= max_rows


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for eager float32 products of several rows (prompts) on CPU: where GemvLinear is used (CPUs on which
    MKL takes its generic path), oneDNN's kernel on the plain weight is 1.2-2x faster than MKL's (all linears of
    the default model, 16-256 rows, 2 threads, AMD EPYC: benchmarks/RESULTS.md)."""
    return (
        not torch.compiler.is_compiling() and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
        and x.numel() > x.shape[-1] and torch.backends.mkldnn.is_available()
    )  # fmt: skip


def _stored_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as float32 ``[rows, 1, in_features]``, materialized before the loops that read it.

    The as_strided makes Inductor store x; otherwise it inlines x's producer (an RMSNorm of the residual
    stream, say) into each loop and recomputes it for every weight row.
    """
    flat = x.reshape(-1, in_features).float().contiguous()
    return torch.as_strided(flat, (flat.shape[0], 1, in_features), (in_features, 0, 1))


def _multiply_sum(weights: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Returns ``[rows, out]``: row r is ``sum_i (weights[i] * inputs[i][r]).sum(-1)``.

    One reduction per row over the same loop: Inductor fuses them into one kernel and converts each weight
    element once for all rows.
    """
    outs = []
    for r in range(inputs[0].shape[0]):
        acc = weights[0] * inputs[0][r]
        for w, x in zip(weights[1:], inputs[1:]):
            acc = acc + w * x[r]
        outs.append(acc.sum(-1))
    return torch.stack(outs)


def loop_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Returns ``F.linear(x, weight)`` (float32/bf16 weight ``[out, in]``) written as loops, in x's dtype."""
    out = _multiply_sum([weight.float()], [_stored_rows(x, weight.shape[1])])
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def int8_lanes(words: torch.Tensor) -> list[torch.Tensor]:
    """Returns the four int8 values of 32-bit words as float32, byte b of each word in lane b (little endian),
    each sign-extended with shifts."""
    return [((words << (24 - 8 * b)) >> 24).float() for b in range(3)] + [(words >> 24).float()]


def int4_lanes(words: torch.Tensor) -> list[torch.Tensor]:
    """Returns the eight 4-bit values 0..15 of 32-bit words as float32, nibble l (bits 4l..4l+3) in lane l."""
    return [((words >> (4 * lane)) & 15).float() for lane in range(8)]


def lane_columns(x: torch.Tensor, in_features: int, bits: int) -> list[torch.Tensor]:
    """Returns x's columns in the weight words' lanes: ``[rows, 1, words]`` per lane, stored as in _stored_rows.

    int8: lane b of word j is column 4j + b. int4 (llama.cpp's nibble order, llama_gen.fast.groupwise): lane
    l = 2c + h of word j = 4 * block + t is column 32 * block + 16h + 4t + c (byte c of the word, nibble h).
    """
    flat = x.reshape(-1, in_features).float()
    rows, lanes = flat.shape[0], 32 // bits
    if bits == 8:
        columns = flat.view(rows, in_features // 4, 4).permute(0, 2, 1)
    else:  # [rows, block, h, t, c] -> [rows, c, h, block, t]
        columns = flat.view(rows, in_features // 32, 2, 4, 4).permute(0, 4, 2, 1, 3)
    words = in_features // lanes
    columns = columns.reshape(rows, lanes, words).contiguous()
    columns = torch.as_strided(columns, (rows, lanes, 1, words), (in_features, words, 0, 1))
    return [columns[:, lane] for lane in range(lanes)]


def loop_int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Returns ``F.linear(x, weight * scales[:, None])`` for an int8 weight ``[out, in]`` (in divisible by 4),
    written as loops, in x's dtype.

    The weight is read as 32-bit words of four int8 values (Inductor vectorizes 32-bit loads, not int8 ones)
    and each value is sign-extended with shifts; x is split into the four matching interleaved columns.
    """
    out_features, in_features = weight.shape
    words = weight.view(torch.float32).view(torch.int32)  # via float32: Inductor then loads full vectors
    out = _multiply_sum(int8_lanes(words), lane_columns(x, in_features, 8)) * scales.float()
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


def loop_lanes_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> torch.Tensor:
    """Returns ``F.linear(x, W)`` for a group-wise int8 (mins None) or int4 weight W (llama_gen.fast.groupwise),
    written as loops, in x's dtype.

    The weight is read as 32-bit words (four int8 or eight int4 values, all in one group); each value is unpacked
    with shifts, scaled by its group's scale (plus its minimum) and multiplied by the matching column of x.
    """
    bits = 8 if mins is None else 4
    out_features, n_words = qweight.shape[0], qweight.shape[1] * qweight.element_size() // 4
    in_features = n_words * 32 // bits
    words = qweight.view(torch.float32).view(torch.int32)  # via float32: Inductor then loads full vectors
    lanes = int8_lanes(words) if bits == 8 else int4_lanes(words)

    def per_word(t: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [out, words]: every word is in one group
        return t.float()[:, :, None].expand(-1, -1, n_words // t.shape[1]).reshape(out_features, n_words)

    scale, low = per_word(scales), None if mins is None else per_word(mins)
    values = [v * scale for v in lanes] if low is None else [v * scale + low for v in lanes]
    out = _multiply_sum(values, lane_columns(x, in_features, bits))
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


class GemvLinear(nn.Module):
    """A linear layer (weight ``[out, in]``, optional bias) computed by loop_linear in compiled code for a few rows."""

    def __init__(self, weight: nn.Parameter, max_rows: int, bias: nn.Parameter | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows  # compiled products of up to this many rows run as loops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_loops(x, self.in_features, self.max_rows):
            out = loop_linear(x, self.weight)
            return out if self.bias is None else out + self.bias
        if uses_onednn(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}, gemv"


def use_gemv_linears(model: nn.Module, max_rows: int) -> nn.Module:
    """Replaces every CPU float32/bf16 ``nn.Linear`` by a GemvLinear sharing its weight and bias (in place; no
    copy), running loops for up to max_rows rows; returns the model."""
    replace_modules(
        model,
        lambda m: (
            type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.bfloat16)
        ),
        lambda m: GemvLinear(m.weight, max_rows, m.bias),
    )
    return model
