"""Group-wise int4 layers on PyTorch's own int4 kernel, for bf16 models on CPUs with native bf16 matmuls.

PyTorch ships a weight-only int4 matmul for CPU (``aten._weight_int4pack_mm_for_cpu``, the kernel torchao's
int4 weight-only CPU layout calls): AVX-512 code that unpacks and scales the weights in registers, for bf16
activations (float32 and fp16 activations run a slow reference loop: ~40-50x slower, measured). On the default
model it runs all linears of a decode step in ~3 ms at one row and ~10 ms at 8 rows, against ~3.8 / ~16 ms for our
float32 loops (llama_gen.fast.columns; benchmarks/RESULTS.md), so a bf16 model's int4 layers use it wherever the
model is prepared for the fast path (compiled, or quantized at load time), for prompts and decode steps alike.

The kernel dequantizes ``w = (q - 8) * scale + zero`` from values q in 0..15: llama.cpp's ``q * s + m`` (our
block layout, llama_gen.fast.groupwise) is ``scale = s, zero = m + 8 s``, both kept in bf16 (the model's dtype;
a GGUF's fp16 scales lose three bits: this layout trades llama.cpp's exact numbers for bf16's).

The layer calls ``quantized::int4mm_packed_weight_cpu`` (the same kernel with its group size in a tensor) rather
than the aten op: Inductor lowers the aten op by adding the group size as a tensor constant of its own, which a
decode step built ahead of time with the caller's tensors as its constants (llama_gen.fast.aot) cannot be given;
here the group size is the layer's buffer, bound like its weights, and the compiled step calls the kernel as is.
"""

import torch
from torch import nn

from llama_gen.fast.groupwise import QuantLinear, unpack_int4
from llama_gen.fast.memory import replace_modules

N_MULTIPLE = 16  # the kernel packs outputs in blocks: a layer's out_features must be a multiple of this


def can_use_int4pack(layer: nn.Module) -> bool:
    """True when this layer is a group-wise int4 QuantLinear the kernel takes (outputs a multiple of N_MULTIPLE)."""
    return type(layer) is QuantLinear and layer.bits == 4 and layer.out_features % N_MULTIPLE == 0


def scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Returns the kernel's ``[groups, out, 2]`` bf16 (scale, zero) of fp16 scales and minimums ``[out, groups]``
    (``zero = m + 8 s`` in float32, then rounded once)."""
    s, m = scales.float(), mins.float()
    return torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


class Int4PackLinear(nn.Module):
    """A bias-free int4 linear layer in the layout of PyTorch's CPU int4 kernel (bf16 activations)."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group: int):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group = group
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_zero", scale_zero, persistent=False)
        self.register_buffer("group_size", torch.tensor(group), persistent=False)  # the kernel takes it as a tensor

    @classmethod
    def from_blocks(cls, layer: QuantLinear) -> "Int4PackLinear":
        """Returns the layer of a group-wise int4 QuantLinear (llama.cpp's block layout), repacked."""
        values = unpack_int4(layer.qweight).to(torch.int32)  # [out, in], 0..15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        return cls(packed, scales_and_zeros(layer.scales, layer.mins), layer.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.quantized.int4mm_packed_weight_cpu(flat, self.packed, self.group_size, self.scale_zero)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int4, group {self.group}, PyTorch's CPU int4 kernel (bf16)"


def use_int4pack_layers(model: nn.Module) -> None:
    """Replaces every group-wise int4 QuantLinear the kernel takes by its Int4PackLinear (in place). An embedding
    tied to the output layer keeps the block layout's tensors (it reads rows, which the packed layout does not
    give), so a tied table is then held twice: once as rows, once packed."""
    replace_modules(model, can_use_int4pack, Int4PackLinear.from_blocks)
