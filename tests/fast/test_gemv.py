"""llama_gen.fast.gemv: products of a few rows written as Inductor's own loops in compiled code."""

import pytest
import torch

from llama_gen.fast.gemv import GemvLinear, use_gemv_linears, uses_onednn
from llama_gen.fast.layout import gemv_max_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_linear_matches_f_linear_eager_and_compiled(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96, bias=False, dtype=dtype)
    biased = torch.nn.Linear(96, 8, bias=True, dtype=dtype)
    model = use_gemv_linears(torch.nn.Sequential(layer, biased), gemv_max_rows(dtype))
    assert isinstance(model[0], GemvLinear) and model[0].weight is layer.weight  # shared, not copied
    assert isinstance(model[1], GemvLinear) and model[1].bias is biased.bias  # a bias (Qwen2's q/k/v) kept
    gemv = model[0]
    compiled = torch.compile(lambda x: torch.relu(gemv(x)) + 1, fullgraph=True)
    compiled_biased = torch.compile(lambda x: model[1](x), fullgraph=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for shape in [(1, 64), (8, 1, 64), (2, 4, 64), (20, 64)]:  # 20 rows: past MAX_ROWS, F.linear
        x = torch.randn(shape).to(dtype)
        # eager: a library kernel (float32 prompts of several rows: oneDNN's, the same product summed in its order)
        eager, library = gemv(x), torch.nn.functional.linear(x, layer.weight)
        assert (eager - library).abs().max().item() <= 1e-6 * library.abs().max().item()
        assert uses_onednn(x, layer.weight) == (dtype == torch.float32 and x.numel() > 64)
        expected = torch.relu(torch.nn.functional.linear(x.float(), layer.weight.float())) + 1
        got = compiled(x)
        assert got.dtype == dtype and got.shape == (*shape[:-1], 96)
        assert (got.float() - expected).abs().max().item() <= tol * expected.abs().max().item()
    with torch.no_grad():  # the biased layer, through the loops (one row: one more graph only)
        expected = torch.nn.functional.linear(got[:1].float(), biased.weight.float(), biased.bias.float())
        out = compiled_biased(got[:1])
    assert (out.float() - expected).abs().max().item() <= tol * expected.abs().max().item()
