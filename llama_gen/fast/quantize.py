"""Quantization schemes by name, and weight-only int8 with per-output-channel scales (``"int8"``).

Names (``--quantize``): ``int8`` is the per-output-channel int8 below (every linear and the embedding). ``int8-gN``
and ``int4-gN`` (N = 32, 64 or 128) are group-wise (llama_gen.fast.groupwise): every linear layer in that format,
and the output layer and embedding in 8 bits with the same groups, or as a suffix says: ``-out4`` (4 bits too),
``-outf`` (kept in float). A scheme is also written out per kind of layer, as a quantized checkpoint records it
(``wq=int4-g32,...,output=int8-g32,embedding=int8-g32``; ``float`` for a kind kept in float). A layer whose
input width is no multiple of the group uses the largest of 128/64/32 that divides it (none: it stays float).

Per-output-channel int8 (``"int8"``):

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

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_gen.fast.gemv import loop_int8_linear, uses_loops
from llama_gen.fast.groupwise import GROUPS, QuantEmbedding, QuantLinear, effective_group, quantized_tensors
from llama_gen.fast.memory import replace_modules
from llama_gen.model import Transformer

QUANTIZATIONS = ("int8", *(f"int{b}-g{g}" for b in (8, 4) for g in GROUPS))  # and the suffixes -out4, -outf
SCHEME_NAME = re.compile(r"int(8|4)-g(32|64|128)(?:-out(4|f))?")
SPEC = re.compile(r"int(8|4)-g(32|64|128)|float")
# scheme kinds -> where their modules are: in each layer, then the model's own
LAYER_KINDS = {
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
}  # fmt: skip
MODEL_KINDS = {"output": "output", "embedding": "tok_embeddings"}
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


def parse_scheme(name: str) -> dict[str, str | None]:
    """Returns the format of each kind of layer (``"int4-g32"``, ..., None: float) a group-wise scheme names;
    raises ValueError for anything else (see the module docstring)."""
    kinds = [*LAYER_KINDS, *MODEL_KINDS]
    if "=" in name:
        specs = dict(part.partition("=")[::2] for part in name.split(","))
        if set(specs) != set(kinds) or not all(SPEC.fullmatch(v) for v in specs.values()):
            raise ValueError(
                f"bad quantization scheme {name!r}: give KIND=int8-gN|int4-gN|float for {', '.join(kinds)}"
            )
        return {k: None if specs[k] == "float" else specs[k] for k in kinds}
    match = SCHEME_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown quantization {name!r}: use one of {', '.join(QUANTIZATIONS)} (group-wise ones may end in -out4 "
            "or -outf: output layer and embedding in 4 bits or float; default 8 bits), or none"
        )
    bits, group, edge = match.groups()
    edge_spec = None if edge == "f" else f"int{edge or 8}-g{group}"
    return {**dict.fromkeys(LAYER_KINDS, f"int{bits}-g{group}"), **dict.fromkeys(MODEL_KINDS, edge_spec)}


def scheme_string(specs: dict[str, str | None]) -> str:
    """Returns the per-kind form of a scheme (what a quantized checkpoint records; parse_scheme reads it)."""
    return ",".join(f"{kind}={spec or 'float'}" for kind, spec in specs.items())


def kind_modules(model: Transformer, layers: int | None = None) -> Iterator[tuple[str, str, nn.Module]]:
    """Yields (kind, module name, module) for the quantizable modules of the first ``layers`` layers (None: all),
    then the output layer and the embedding; modules fused away are left out."""
    for i, layer in enumerate(model.layers[:layers]):
        for kind, path in LAYER_KINDS.items():
            owner, attr = path.split(".")
            module = getattr(getattr(layer, owner), attr, None)
            if module is not None:
                yield kind, f"layers.{i}.{path}", module
    for kind, name in MODEL_KINDS.items():
        yield kind, name, getattr(model, name)


def layer_spec(module: nn.Module) -> str | None:
    """Returns a module's group-wise format (``"int4-g32"``, ...), or None for a float one."""
    if not isinstance(module, (QuantLinear, QuantEmbedding)):
        return None
    in_features = module.qweight.shape[1] * (8 // module.bits)
    return f"int{module.bits}-g{in_features // module.scales.shape[1]}"


def model_scheme(model: Transformer) -> str | None:
    """Returns the quantization a model's layers have: "int8" (per channel), a group-wise scheme's per-kind form,
    or None (float)."""
    if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()):
        return "int8"
    specs = {kind: layer_spec(module) for kind, _, module in kind_modules(model, layers=1)}
    return scheme_string(specs) if any(specs.values()) else None


def check_quantization(method: str | None) -> None:
    """Raises ValueError unless method is None or a known quantization (a name or a per-kind scheme)."""
    if method is not None and method != "int8":
        parse_scheme(method)


def quantize_grouped(model: Transformer, specs: dict[str, str | None], loop_rows: int) -> Transformer:
    """Replaces each float linear layer and the embedding by its group-wise version as ``specs`` (parse_scheme)
    says (in place; layers already quantized are kept); returns the model. Linears run loops for up to
    ``loop_rows`` rows in compiled code."""
    dtype, plan = model.norm.weight.dtype, {}
    for kind, _, module in kind_modules(model):
        if specs[kind] is not None and type(module) in (nn.Linear, nn.Embedding):
            bits, group = (int(g) for g in SPEC.fullmatch(specs[kind]).groups())
            group = effective_group(module.weight.shape[1], group)
            if group is not None:
                plan[module] = (bits, group)

    def replace(m: nn.Module) -> nn.Module:
        if type(m) is nn.Embedding:
            return QuantEmbedding.from_embedding(m, *plan[m], dtype)
        return QuantLinear.from_linear(m, *plan[m], loop_rows)

    replace_modules(model, lambda m: m in plan, replace)
    return model


def quantize(model: Transformer, method: str | None, kernels: Int8Kernels) -> Transformer:
    """Applies a quantization by name ("int8", a group-wise scheme; its layers multiplying with ``kernels``), or
    nothing for None; returns the model."""
    if method is None:
        return model
    check_quantization(method)
    if any(type(m).__module__.startswith("fairscale") for m in model.modules()):
        raise ValueError("quantization needs model_parallel_size=1 (plain nn.Linear layers)")
    if method == "int8":
        return quantize_int8(model, kernels)
    if any(isinstance(m, nn.Linear) and m.bias is not None for m in model.modules()):
        raise ValueError(f"--quantize {method} is for models without biases (Qwen2's q/k/v have them): use int8")
    return quantize_grouped(model, parse_scheme(method), kernels.loop_rows)


def share_tied_output(model: Transformer) -> None:
    """Makes a group-wise output layer use the embedding's tensors where they are equal (a tied model quantized
    from a checkpoint that stores two copies), so one copy stays in memory (and in a quantized checkpoint)."""
    out, emb = model.output, model.tok_embeddings
    if not (isinstance(out, QuantLinear) and isinstance(emb, QuantEmbedding)) or layer_spec(out) != layer_spec(emb):
        return
    names = quantized_tensors(emb)
    if all(torch.equal(getattr(out, name), tensor) for name, tensor in names.items()):
        for name, tensor in names.items():
            setattr(out, name, tensor)
