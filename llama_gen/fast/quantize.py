"""Weight-only int8 quantization with per-output-channel scales.

Each weight row ``w[n, :]`` is stored as int8 ``q[n, :]`` with one scale ``s[n] = max|w[n, :]| / 127``, so
``w ≈ q * s[:, None]``. Activations keep the model's dtype. Matmuls use PyTorch's own kernels: on CPU
``torch.ops.aten._weight_int8pack_mm`` (fed bf16 activations: its float32 variant is not vectorized) for the few
rows of a decode step (for one row in compiled code, Inductor's own loops instead: llama_gen.fast.gemv, ~2x
faster on AVX2), and for prompts (many rows) the int8 weight converted to bf16 once and bf16's matmul, or
float32's on a CPU without native bf16 matmuls (measured ~9x faster at 512 rows with bf16, ~2x with float32:
the int8 kernel's cost grows with every row); elsewhere ``F.linear(x, q.to(x.dtype)) * s`` (the gpt-fast
formulation, which ``torch.compile`` fuses into one kernel). Which of these the CPU gets is decided once at load
time (llama_gen.fast.layout.choose_layout) and handed to every layer as an Int8Kernels.
Weights are quantized one at a time and the float weight's memory-mapped pages are dropped right after, so
the float and int8 models never coexist in memory.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_gen.fast.gemv import loop_int8_linear, uses_loops
from llama_gen.fast.memory import replace_modules
from llama_gen.model import Transformer

QUANTIZATIONS = ("int8",)
DEQUANTIZE_MIN_ROWS = 16  # CPU: from this many rows on, a matmul on the converted weight beats the int8 kernel


def quantize_rows(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (int8 weight, float32 per-row scales) with ``weight ≈ q * scales[:, None]`` (symmetric).

    Works through the rows in chunks so the float temporaries stay small.
    """
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        w = weight[start : start + chunk_rows].detach().float()
        s = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[start : start + chunk_rows] = torch.round(w / s[:, None]).clamp_(-128, 127)
        scales[start : start + chunk_rows] = s
    return q, scales


@dataclass(frozen=True)
class Int8Kernels:
    """What an Int8Linear multiplies with on CPU, chosen for the CPU at load time (llama_gen.fast.layout)."""

    prompt_dtype: torch.dtype  # from DEQUANTIZE_MIN_ROWS rows on: the weight converted to this dtype, its matmul
    loop_rows: int  # compiled code: products of up to this many rows run as Inductor's loops (0: never)


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight ``[out, in]``, per-output-channel scales ``[out]`` and an optional bias
    ``[out]`` kept in the activations' dtype."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, kernels: Int8Kernels, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))  # for the CPU kernel (see forward)
        self.kernels = kernels
        # the loops read the weight as 32-bit words of four int8 values (gemv.loop_int8_linear)
        self.max_rows = kernels.loop_rows if self.in_features % 4 == 0 else 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype, kernels: Int8Kernels) -> "Int8Linear":
        """Returns the layer quantized from linear's weight, its scales in ``dtype`` (the activations')."""
        q, scales = quantize_rows(linear.weight)
        return cls(q, scales.to(dtype), kernels, None if linear.bias is None else linear.bias.detach().to(dtype))

    @classmethod
    def concat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """Returns one layer computing ``torch.cat([p(x) for p in parts], -1)`` (per-row scales and biases
        concatenate)."""
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        return cls(torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts]), parts[0].kernels, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)
        return out if self.bias is None else out + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """Returns x times the dequantized weight (no bias)."""
        if x.device.type != "cpu":
            return F.linear(x, self.weight.to(x.dtype)) * self.scales
        if uses_loops(x, self.in_features, self.max_rows):
            return loop_int8_linear(x, self.weight, self.scales)
        # PyTorch's CPU int8 kernel is vectorized for bf16 (and fp16) activations, not for float32.
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.shape[0] >= DEQUANTIZE_MIN_ROWS:
            dtype = self.kernels.prompt_dtype  # int8 values are exact in bf16 and float32
            out = F.linear(flat.to(dtype), self.weight.to(dtype)) * self.scales.to(dtype)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales_bf16)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with one scale per token."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, dtype: torch.dtype) -> "Int8Embedding":
        q, scales = quantize_rows(embedding.weight)
        return cls(q, scales.to(dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight).to(self.scales.dtype)
        return rows * F.embedding(tokens, self.scales[:, None])


def quantize_int8(model: Transformer, kernels: Int8Kernels) -> Transformer:
    """Replaces every plain ``nn.Linear`` and ``nn.Embedding`` by its int8 version (in place); returns the model.

    The scales are stored in the activations' dtype (the norm weights'); norm weights, rotary table and KV
    cache are untouched.
    """
    dtype = model.norm.weight.dtype
    replace_modules(
        model,
        lambda m: type(m) in (nn.Linear, nn.Embedding),
        lambda m: (
            Int8Linear.from_linear(m, dtype, kernels)
            if type(m) is nn.Linear
            else Int8Embedding.from_embedding(m, dtype)
        ),
    )
    return model


def check_quantization(method: str | None) -> None:
    """Raises ValueError unless method is None or a known quantization name."""
    if method is not None and method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}: use one of {', '.join(QUANTIZATIONS)} (or none)")


def quantize(model: Transformer, method: str | None, kernels: Int8Kernels) -> Transformer:
    """Applies a quantization by name ("int8", its layers multiplying with ``kernels``), or nothing for None;
    returns the model."""
    if method is None:
        return model
    check_quantization(method)
    if any(type(m).__module__.startswith("fairscale") for m in model.modules()):
        raise ValueError("int8 quantization needs model_parallel_size=1 (plain nn.Linear layers)")
    return quantize_int8(model, kernels)
