"""llama_gen.fast.quantize: weight-only int8 layers and models against their float versions."""

import pytest
import torch
from test_engine import PROMPTS, build

from llama_gen.fast import layout
from llama_gen.fast.layout import INT8_MAX_ROWS, int8_kernels
from llama_gen.fast.quantize import Int8Linear, quantize_rows


def test_quantize_rows_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert q.abs().max().item() == 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize(
    "native_bf16, prompt_dtype", [(True, torch.bfloat16), (False, torch.float32)], ids=["native bf16", "no bf16"]
)
def test_int8_linear_matches_dequantized_weight(monkeypatch, native_bf16, prompt_dtype):
    monkeypatch.setattr(layout, "has_native_bf16_matmul", lambda: native_bf16)
    kernels = int8_kernels()
    assert kernels.prompt_dtype == prompt_dtype  # prompts: the weight dequantized to bf16 only where it is native
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    int8 = Int8Linear.from_linear(linear, torch.float32, kernels)
    fused = Int8Linear.concat([int8, int8])
    assert fused.kernels == kernels
    for rows in (5, 40):  # a decode step's few rows (the int8 kernel) and a prompt's many (a dequantized matmul)
        x = torch.randn(2, rows, 96)
        reference = torch.nn.functional.linear(x, int8.weight.float() * int8.scales[:, None])
        # both CPU paths take bf16 activations: about bf16 precision
        assert torch.allclose(int8(x), reference, rtol=2e-2, atol=2e-2)
        assert torch.equal(fused(x), torch.cat([int8(x), int8(x)], dim=-1))


def test_int8_loops_match_the_dequantized_product():
    torch.manual_seed(0)
    q, scales = quantize_rows(torch.randn(96, 64))
    layer = Int8Linear(q, scales, int8_kernels())
    compiled = torch.compile(lambda x: layer(x) + 1, fullgraph=True)
    for shape in [(1, 64), (1, 1, 64), (8, 64), (20, 64)]:
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x, q.float() * scales[:, None]) + 1
        got = compiled(x)
        # loops in float32 up to INT8_MAX_ROWS rows; beyond, and eagerly, PyTorch's kernels (bf16 activations)
        tol = 1e-5 if x.numel() // 64 <= INT8_MAX_ROWS else 1e-2
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= tol * expected.abs().max().item()
        assert (layer(x) + 1 - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()


def test_int8_model_close_to_fp32(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    llama = build(ckpt)
    tokens = torch.tensor([PROMPTS[2]])
    expected = llama.model.forward(tokens, 0)
    quantized = build(ckpt, quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.model.modules())
    assert quantized.model.layers[0].feed_forward.w13 is not None  # fused after quantization
    got = quantized.model.forward(tokens, 0)
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.7  # random weights: close logits
    out, _ = quantized.generate(PROMPTS[:2], max_gen_len=6, temperature=0)
    assert all(len(o) == 6 for o in out)


def test_unknown_quantization_is_rejected(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["mha"]
    with pytest.raises(ValueError, match="int8"):
        build(ckpt, quantize="int3")
