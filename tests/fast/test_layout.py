"""llama_gen.fast.layout: the one load-time choice of weight layout and kernels, and its application."""

import dataclasses
import json

import pytest
import torch

from llama_gen.fast import layout
from llama_gen.fast.columns import ColumnQuantLinear
from llama_gen.fast.gemv import GemvLinear
from llama_gen.fast.groupwise import QuantLinear
from llama_gen.fast.layout import INT8_MAX_ROWS, MAX_ROWS, NATIVE_BF16_MAX_ROWS, Layout, apply_layout
from llama_gen.fast.quantize import Int8Kernels, Int8Linear
from llama_gen.model import ModelArgs, Transformer


def tiny_model(dtype: torch.dtype = torch.float32, max_batch: int = 1) -> Transformer:
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_batch_size=max_batch, max_seq_len=16)
    return Transformer(args).to(dtype)


@pytest.mark.parametrize(
    "native_bf16, intel, dtype, max_batch, weights",
    [
        (True, True, torch.bfloat16, 1, "gemv"),
        (True, False, torch.bfloat16, 4, "gemv"),  # native bf16: loops for
        (True, False, torch.bfloat16, 8, "packed"),  # few rows, packed for larger batches,
        (False, False, torch.bfloat16, 8, "gemv"),
        (False, False, torch.bfloat16, 1, "gemv"),  # else Inductor's loops
        (True, True, torch.float32, 8, "packed"),
        (True, True, torch.float32, 1, "plain"),  # Intel: MKL's gemv at batch 1
        (False, False, torch.float32, 1, "gemv"),
        (False, False, torch.float32, 8, "gemv"),  # others: loops for few rows,
        (False, False, torch.float32, 16, "packed"),  # packed beyond
        (True, True, torch.float16, 1, "plain"),
    ],
)
def test_cpu_weight_layout_follows_the_cpu(monkeypatch, native_bf16, intel, dtype, max_batch, weights):
    monkeypatch.setattr(layout, "has_native_bf16_matmul", lambda: native_bf16)
    monkeypatch.setattr(layout, "mkl_gemv_is_fastest", lambda: intel)
    model = tiny_model(dtype, max_batch)
    assert layout.cpu_weight_layout(model) == weights
    assert layout.choose_layout(model, compile=True, quantize=None).weights == weights
    assert layout.choose_layout(model, compile=False, quantize=None).weights == "plain"  # eager: library kernels
    model.to("meta")  # not a CPU model: library kernels
    assert layout.cpu_weight_layout(model) == "plain"


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native bf16", "no bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_follow_the_cpu(monkeypatch, native_bf16, dtype):
    monkeypatch.setattr(layout, "has_native_bf16_matmul", lambda: native_bf16)
    chosen = layout.choose_layout(tiny_model(dtype), compile=True, quantize="int8")
    assert chosen.quantize == "int8"
    # loops for up to 8 rows, but only 4 for bf16 where oneDNN's bf16 kernel is native
    assert chosen.gemv_rows == (NATIVE_BF16_MAX_ROWS if native_bf16 and dtype == torch.bfloat16 else MAX_ROWS)
    # an int8 prompt's matmul runs on the weight converted to bf16 only where bf16 matmuls are native
    assert chosen.int8 == Int8Kernels(torch.bfloat16 if native_bf16 else torch.float32, INT8_MAX_ROWS)


def test_layout_round_trips_through_json():
    chosen = Layout("int8", "packed", 4, Int8Kernels(torch.bfloat16, 1))
    assert Layout.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen
    plain = Layout(None, "gemv", 8, Int8Kernels(torch.float32, 0), columns_rows=8)
    assert Layout.from_json(json.loads(json.dumps(plain.to_json()))) == plain


def test_group_wise_layers_take_the_column_layout_for_a_compiled_cpu_step():
    model = tiny_model()
    assert layout.choose_layout(model, compile=False, quantize="int4-g32").columns_rows == 0  # eager: block layout
    chosen = layout.choose_layout(model, compile=True, quantize="int4-g32")
    assert chosen.columns_rows == MAX_ROWS
    apply_layout(model, chosen)
    columns = [m for m in model.modules() if isinstance(m, ColumnQuantLinear)]
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert len(columns) == 5 and all(m.max_rows == MAX_ROWS for m in columns)  # wqkv, wo, w13, w2, output


def test_apply_layout_hands_the_kernels_to_every_layer():
    model = tiny_model()
    apply_layout(model, Layout(None, "gemv", 3, Int8Kernels(torch.float32, 1)))
    gemv = [m for m in model.modules() if isinstance(m, GemvLinear)]
    assert len(gemv) == 5 and all(m.max_rows == 3 for m in gemv)  # wqkv, wo, w13, w2, output
    kernels = Int8Kernels(torch.bfloat16, 1)
    model = tiny_model()
    apply_layout(model, Layout("int8", "gemv", 3, kernels))
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert not any(isinstance(m, GemvLinear) for m in model.modules())
    assert int8 and all(m.kernels == kernels for m in int8)  # fused layers included
    assert model.layers[0].attention.wqkv in int8 and model.layers[0].feed_forward.w13 in int8


def biased_model(seed: int = 0) -> Transformer:
    """Returns a tiny random model with Qwen2's q/k/v biases (O(1) values, so they matter)."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_batch_size=2, max_seq_len=16)
    model = Transformer(dataclasses.replace(args, qkv_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    return model


@pytest.mark.parametrize(
    "weights, quantize", [("plain", None), ("gemv", None), ("packed", None), ("gemv", "int8")], ids=str
)
def test_every_layout_keeps_the_qkv_biases(weights, quantize):
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    expected = biased_model().forward(tokens, 0)
    model = biased_model()
    biases = [torch.cat([getattr(model.layers[i].attention, w).bias for w in ("wq", "wk", "wv")]) for i in range(2)]
    apply_layout(model, Layout(quantize, weights, 8, Int8Kernels(torch.float32, 0)))
    for i in range(2):
        assert torch.equal(model.layers[i].attention.wqkv.bias, biases[i])  # fused, in q, k, v order
    got = model.forward(tokens, 0)
    assert (got - expected).abs().max().item() <= (0.05 * expected.std().item() if quantize else 1e-5)
    with torch.no_grad():
        model.layers[0].attention.wqkv.bias.zero_()  # control: the biases are used
    assert (model.forward(tokens, 0) - expected).abs().max().item() > 0.1 * expected.std().item()
