"""Linear layers that ``torch.compile`` turns into its own matrix-vector loops, for decoding on CPU.

A decode step multiplies every weight by a few rows (one per sequence), so it is limited by how fast the
weights stream from memory. Where PyTorch's library kernels fall short of that (float32 on non-Intel CPUs,
where MKL takes a generic path; bf16 on CPUs without native bf16 matmuls, where the fallback kernel is
scalar), writing the product as a broadcast multiply and sum lets Inductor generate one vectorized loop per
layer that reads each weight row once, for all rows of the input, accumulating in float32. Measured on an
AVX2 AMD EPYC (2 threads, all linears of a SmolLM2-135M step): float32, 1 row, 18 ms vs 40 ms (MKL) and
24 ms (oneDNN-packed); bf16, 1 row, 10 ms vs 16 ms; bf16, 8 rows, 55 ms vs 112 ms (benchmarks/RESULTS.md).

Only the compiled decode step takes this form; eager calls and prompts (many rows) use ``F.linear``.
"""

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16  # more rows than this: a matmul kernel does better (the loop reads each weight row once per call)


class GemvLinear(nn.Module):
    """A bias-free linear layer (weight ``[out, in]``) compiled as a multiply-and-sum for a few input rows."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not torch.compiler.is_compiling() or rows > MAX_ROWS:
            return F.linear(x, self.weight)
        # as_strided makes Inductor store x before the loop; otherwise it inlines x's producer (an RMSNorm of the
        # residual stream, say) into the loop and recomputes it for every weight row.
        flat = torch.as_strided(x.float().contiguous(), (1, rows, self.in_features), (0, self.in_features, 1))
        # [out, rows]: output-major, so the generated loop finishes one weight row for every input row before
        # moving to the next weight row (the row stays in cache instead of being read `rows` times).
        out = (self.weight[:, None, :].float() * flat).sum(-1)
        return out.t().reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}, gemv"


def use_gemv_linears(model: nn.Module) -> nn.Module:
    """Replaces every bias-free CPU float32/bf16 ``nn.Linear`` by a GemvLinear sharing its weight (in place; no
    copy); returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.bias is None and child.weight.device.type == "cpu"
                    and child.weight.dtype in (torch.float32, torch.bfloat16)):
                setattr(parent, name, GemvLinear(child.weight))
    return model
