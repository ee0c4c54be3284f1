"""llama_gen.fast.packed: linear layers with oneDNN-packed weights, eager and compiled."""

import pytest
import torch

from llama_gen.devices import has_native_bf16_matmul
from llama_gen.fast.packed import PackedLinear, can_pack, pack_linears


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_f_linear_eager_and_compiled(dtype):
    torch.manual_seed(0)
    weight = torch.randn(96, 64).to(dtype)
    if dtype == torch.bfloat16 and not has_native_bf16_matmul():  # e.g. an AVX2-only CPU: oneDNN cannot pack bf16
        assert not can_pack(weight)
        model = pack_linears(torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False, dtype=dtype)), batch_size=8)
        assert type(model[0]) is torch.nn.Linear
        return
    layer = PackedLinear(weight, batch_size=8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 64), (8, 64), (2, 5, 64)]:
        x = torch.randn(shape).to(dtype)
        expected = torch.nn.functional.linear(x.float(), weight.float())
        assert layer(x).dtype == dtype and layer(x).shape == (*shape[:-1], 96)
        assert (layer(x).float() - expected).abs().max().item() <= tol * expected.abs().max().item()
    compiled = torch.compile(lambda x: torch.relu(layer(x)) + 1, fullgraph=True)  # an opaque op: no graph break
    x = torch.randn(3, 64).to(dtype)
    assert torch.allclose(compiled(x).float(), torch.relu(layer(x)).float() + 1, rtol=tol, atol=tol)


def test_pack_linears_replaces_plain_layers_and_keeps_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(32, 8, bias=True))
    x = torch.randn(4, 16)
    expected, model_bias = model(x), model[1].bias.detach().clone()
    pack_linears(model, batch_size=4)
    assert isinstance(model[0], PackedLinear) and isinstance(model[1], PackedLinear)  # a bias (Qwen2's q/k/v) kept
    assert model[0].bias is None and torch.equal(model[1].bias, model_bias)
    assert torch.allclose(model(x), expected, atol=1e-5)
