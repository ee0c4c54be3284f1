"""llama_gen.fast.int4pack: group-wise int4 layers on PyTorch's own CPU int4 kernel, for bf16 models."""

import pytest
import torch
from test_aot import untied_steps

from llama_gen.devices import has_native_bf16_matmul
from llama_gen.fast import layout
from llama_gen.fast.groupwise import QuantLinear, dequantize
from llama_gen.fast.int4pack import Int4PackLinear, use_int4pack_layers
from llama_gen.model import ModelArgs, Transformer

needs_native_bf16 = pytest.mark.skipif(
    not has_native_bf16_matmul(), reason="PyTorch's int4 CPU kernel is for CPUs with native bf16 matmuls"
)


def random_int4_layer(out_features: int, in_features: int, group: int) -> QuantLinear:
    torch.manual_seed(out_features + group)
    return QuantLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=False), 4, group, max_rows=8)


@needs_native_bf16
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_kernel_layer_computes_the_block_layout_product(group, rows):
    blocks = random_int4_layer(48, 256, group)
    layer = Int4PackLinear.from_blocks(blocks)
    x = torch.randn(2, rows, 256).to(torch.bfloat16)
    got = layer(x)
    assert got.shape == (2, rows, 48) and got.dtype == torch.bfloat16
    # llama.cpp's q * s + m in float64, with the kernel's bf16 inputs: its scales and zeros are bf16 too, and it
    # rounds its output to bf16
    weight = dequantize(blocks.qweight, blocks.scales, blocks.mins).double()
    expected = x.double() @ weight.t()
    error = (got.double() - expected).abs().max().item()
    assert error <= 1e-2 * expected.abs().max().item()


def test_layers_the_kernel_cannot_take_stay_as_they_are():
    model = torch.nn.Module()
    model.tok_embeddings = torch.nn.Embedding(8, 64)
    model.fits = random_int4_layer(48, 64, 32)
    model.odd = random_int4_layer(40, 64, 32)  # outputs no multiple of 16
    model.int8 = QuantLinear.from_linear(torch.nn.Linear(64, 48, bias=False), 8, 32, max_rows=8)
    use_int4pack_layers(model)
    assert type(model.fits) is Int4PackLinear
    assert type(model.odd) is QuantLinear and type(model.int8) is QuantLinear


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native bf16", "no bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_bf16_models_on_native_bf16_cpus_take_the_kernel(monkeypatch, native_bf16, dtype):
    monkeypatch.setattr(layout, "has_native_bf16_matmul", lambda: native_bf16)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, max_batch_size=1, max_seq_len=16)
    model = Transformer(args).to(dtype)
    for compile in (True, False):
        chosen = layout.choose_layout(model, compile=compile, quantize="int4-g32")
        assert chosen.int4pack == (native_bf16 and dtype == torch.bfloat16)


@needs_native_bf16
def test_compiled_step_calls_the_kernel_and_equals_eager(monkeypatch):
    # The step built ahead of time calls the kernel as an opaque op; its group size is a layer buffer, bound with
    # the weights when the package is loaded (Inductor's own lowering of the aten op would add a constant of its
    # own, which such a package cannot be given). Teacher-forced: the same tokens through both, logits compared.
    monkeypatch.setenv("LLAMA_GEN_AOT", "1")
    llamas, steps = untied_steps(torch.bfloat16, "int4-g32")
    for llama in llamas:
        kernels = [m for m in llama.model.modules() if isinstance(m, Int4PackLinear)]
        # wqkv, wo, w13 and w2 of both layers (the output layer is int8 in this scheme)
        assert len(kernels) == 8 and not any(getattr(m, "bits", 0) == 4 for m in llama.model.modules())
    assert all(difference <= 0.1 * spread for difference, spread in steps)  # bf16: Inductor rounds less often
