"""llama_gen.fast.groupwise: group-wise int8/int4 against llama.cpp's own formats (the gguf package's reference
quantizers) and the float model; quantized checkpoints written and loaded."""

import json

import pytest
import torch
from conftest import LLAMA2_TOKENIZER
from test_engine import PROMPTS, build

from llama_gen.apps import cli
from llama_gen.apps.info import model_info
from llama_gen.fast.groupwise import QuantEmbedding, QuantLinear, dequantize, pack_int4, quantize_groups, unpack_int4
from llama_gen.fast.quantize import parse_scheme, scheme_string

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from llama_gen.convert.gguf_blocks import block_tensors  # noqa: E402


class Stored:
    """A GGUF tensor as the reader gives it: raw block bytes, dims innermost first."""

    def __init__(self, data, kind: Q, rows: int, cols: int):
        self.data, self.tensor_type, self.shape, self.name = data, kind, (cols, rows), "t"


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_blocks_dequantize_exactly_as_llama_cpp(kind):
    torch.manual_seed(0)
    w = (torch.randn(48, 96) * torch.rand(48, 1)).numpy()
    stored = gguf.quants.quantize(w, kind)
    expected = torch.from_numpy(gguf.quants.dequantize(stored, kind).reshape(w.shape))
    tensors = block_tensors(Stored(stored, kind, 48, 96), "x.gguf")
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (48, 3)
    assert torch.equal(dequantize(tensors["qweight"], tensors["scales"], tensors.get("mins")), expected)


@pytest.mark.parametrize("bits, group", [(8, 32), (8, 128), (4, 32), (4, 64)])
def test_quantize_groups_round_trip(bits, group):
    torch.manual_seed(0)
    w = torch.randn(40, 256) * torch.rand(40, 1)
    q, scales, mins = quantize_groups(w, bits, group)
    assert scales.shape == (40, 256 // group) and (mins is None) == (bits == 8)
    values = q if bits == 8 else unpack_int4(q)
    assert torch.equal(pack_int4(unpack_int4(q)), q) if bits == 4 else q.abs().max() == 127
    assert values.shape == w.shape
    step = scales.float().repeat_interleave(group, dim=1)
    assert ((dequantize(q, scales, mins) - w).abs() <= step * 0.51 + 1e-6).all()  # nearest point of each grid


def test_q8_0_rule_matches_llama_cpp():
    # our int8 g32 rule is Q8_0's: the same bytes as llama.cpp's reference quantizer (ties aside)
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    q, scales, _ = quantize_groups(w, 8, 32)
    ref = block_tensors(Stored(gguf.quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0, 16, 64), "x.gguf")
    assert torch.equal(scales, ref["scales"]) and (q.int() - ref["qweight"].int()).abs().max() <= 1


def test_loops_match_the_dequantized_product():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = [
        QuantLinear(*quantize_groups(torch.randn(72, 256), bits, group), max_rows=1)
        for bits, group in [(8, 64), (4, 32)]
    ]
    weights = [dequantize(layer.qweight, layer.scales, layer.mins) for layer in layers]
    compiled = torch.compile(lambda x: [layer(x) + 1 for layer in layers], fullgraph=True)
    for shape in [(1, 1, 256)]:  # a decode step's one row: loops (more rows and eager calls: the dequantized weight)
        x = torch.randn(shape)
        for layer, weight, got in zip(layers, weights, compiled(x)):
            expected = torch.nn.functional.linear(x, weight) + 1
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)
            assert torch.allclose(layer(x) + 1, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_eager_product_in_chunks_equals_one_product(bits):
    # more outputs than a chunk (1024), and a last chunk shorter than the others
    torch.manual_seed(bits)
    layer = QuantLinear(*quantize_groups(torch.randn(1100, 64), bits, 32), max_rows=1)
    x = torch.randn(2, 3, 64)
    expected = torch.nn.functional.linear(x, dequantize(layer.qweight, layer.scales, layer.mins))
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_schemes_by_name():
    int4 = parse_scheme("int4-g64")
    assert int4["wq"] == int4["w2"] == "int4-g64" and int4["output"] == int4["embedding"] == "int8-g64"
    assert parse_scheme("int4-g32-out4")["output"] == "int4-g32" and parse_scheme("int8-g32-outf")["output"] is None
    assert parse_scheme(scheme_string(int4)) == int4
    for bad in ["int4", "int4-g16", "int8-g32-out8x", "wq=int4-g32"]:
        with pytest.raises(ValueError, match="quantization"):
            parse_scheme(bad)


@pytest.mark.parametrize("scheme, close, agree", [("int8-g32", 0.05, 0.8), ("int4-g32", 0.25, 0.5)])
def test_quantized_model_close_to_float(tiny_checkpoints, scheme, close, agree):
    _, ckpt = tiny_checkpoints["mha"]  # every width a multiple of 32
    tokens = torch.tensor([PROMPTS[2]])
    expected = build(ckpt).model.forward(tokens, 0)
    llama = build(ckpt, quantize=scheme)
    model = llama.model
    assert isinstance(model.tok_embeddings, QuantEmbedding) and isinstance(model.output, QuantLinear)
    assert model.layers[0].attention.wqkv is not None and model.layers[0].feed_forward.w13 is not None
    got = model.forward(tokens, 0)
    assert (got - expected).abs().max().item() < close * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= agree  # random weights: fragile argmax


def test_quantize_command_writes_a_checkpoint_build_loads(tiny_checkpoints, tmp_path, capsys):
    _, ckpt = tiny_checkpoints["mha"]
    out = tmp_path / "int4"
    cli.main(["quantize", str(ckpt), str(out), "--scheme", "int4-g32-out4", "--tokenizer_path", str(LLAMA2_TOKENIZER)])
    params = json.loads((out / "params.json").read_text())
    assert parse_scheme(params["quantization"]) == parse_scheme("int4-g32-out4")
    state = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    assert state["layers.0.attention.wq.qweight"].dtype == torch.uint8 and "layers.0.attention.wq.weight" not in state
    loaded, direct = build(out), build(ckpt, quantize="int4-g32-out4")
    tokens = torch.tensor([PROMPTS[0]])
    assert torch.equal(loaded.model.forward(tokens, 0), direct.model.forward(tokens, 0))
    info = model_info(str(out), str(LLAMA2_TOKENIZER), device="cpu")
    file_bytes = (out / "consolidated.00.pth").stat().st_size
    assert 0.9 * file_bytes < info["quantized_weight_bytes"] <= file_bytes < info["weight_bytes"]["fp32"] / 6
    with pytest.raises(ValueError, match="already quantized"):
        build(out, quantize="int8-g32")
    with pytest.raises(SystemExit):
        cli.main(["quantize", str(ckpt), str(out), "--tokenizer_path", str(LLAMA2_TOKENIZER)])  # not over a checkpoint
    assert "exists and is not empty" in capsys.readouterr().err
