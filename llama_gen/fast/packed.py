"""Linear layers with oneDNN-packed weights, for decoding on CPU.

A plain ``F.linear`` repacks the weight into the matmul kernel's blocked layout on every call. For bf16 that
costs as much as the matmul itself at every batch size; for float32, MKL's batch-1 kernel needs no packing,
but at batch 8 the per-call repack halves the speed. Packing each weight once at load time (PyTorch's
``mkldnn._reorder_linear_weight``, the same op Inductor uses when it freezes a model) removes that cost.

The packed weight is an opaque oneDNN tensor, which neither ``torch.compile`` nor ``torch.export`` can take as
an input; the layer therefore calls it through the custom op ``llama_gen::packed_linear``, which names the
weight by a key held in a one-element buffer (the layer's ``handle``), so the compiled decode step sees an
opaque call with ordinary tensors in and out. Being a buffer, the key is bound like any other model tensor
when a step built ahead of time in another process is loaded (llama_gen.fast.aot), so that process's keys never
matter.
"""

import itertools
import weakref

import torch
from torch import nn

from llama_gen.devices import has_native_bf16_matmul
from llama_gen.fast.memory import replace_modules

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

_weights: dict[int, "weakref.ref[torch.Tensor]"] = {}  # key -> packed weight (owned by its PackedLinear)
_keys = itertools.count()


# Registered with torch.library.Library rather than the @custom_op decorator: the decorator's Python wrapper
# costs ~7 us more per call (measured), and a decode step makes 121 of these calls.
_lib = torch.library.Library("llama_gen", "DEF")
_lib.define("packed_linear(Tensor x, Tensor handle, int out_features) -> Tensor")


def packed_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """Returns ``x @ W.T`` for the packed weight W registered under the key in ``handle`` (``[..., out_features]``)."""
    return torch.ops.mkldnn._linear_pointwise(x, _weights[int(handle)](), None, "none", [], "")


def _packed_linear_shape(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


_lib.impl("packed_linear", packed_linear, "CPU")
torch.library.register_fake("llama_gen::packed_linear", _packed_linear_shape, lib=_lib)


def can_pack(weight: torch.Tensor) -> bool:
    """True when this weight can be packed: a CPU float32 matrix with PyTorch built with oneDNN, or a bf16 one
    on a CPU with native bf16 matmuls."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKABLE_DTYPES
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and (weight.dtype != torch.bfloat16 or has_native_bf16_matmul())
    )


class PackedLinear(nn.Module):
    """A linear layer whose weight ``[out, in]`` is stored in oneDNN's packed layout (its bias, if any, as it is)."""

    def __init__(self, weight: torch.Tensor, batch_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size)
        key = next(_keys)
        _weights[key] = weakref.ref(self.packed, lambda _, key=key: _weights.pop(key, None))
        self.register_buffer("handle", torch.tensor([key]), persistent=False)

    def nbytes(self) -> int:
        """Bytes of the packed weight (it is not a parameter or buffer, so ``parameters()`` does not see it)."""
        return self.packed.numel() * self.packed.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.llama_gen.packed_linear.default(x.to(self.dtype), self.handle, self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, oneDNN-packed"


def pack_linears(model: nn.Module, batch_size: int) -> nn.Module:
    """Replaces every plain CPU float32/bf16 ``nn.Linear`` by a PackedLinear in place; returns the model."""
    replace_modules(
        model,
        lambda m: type(m) is nn.Linear and can_pack(m.weight),
        lambda m: PackedLinear(m.weight, batch_size, m.bias),
    )
    return model
