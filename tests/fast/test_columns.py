"""llama_gen.fast.columns: group-wise weights in the column layout give the block layout's numbers."""

import pytest
import torch

from llama_gen.fast.columns import ColumnQuantEmbedding, ColumnQuantLinear, dequantize_columns, use_column_layers
from llama_gen.fast.groupwise import QuantEmbedding, QuantLinear, dequantize, quantize_groups


def layer(bits: int, group: int, out_features: int = 72, in_features: int = 256) -> QuantLinear:
    return QuantLinear(*quantize_groups(torch.randn(out_features, in_features), bits, group), max_rows=1)


@pytest.mark.parametrize("bits, group", [(8, 32), (8, 128), (4, 32), (4, 64), (4, 128)])
def test_column_layout_holds_the_same_weight(bits, group):
    torch.manual_seed(bits + group)
    blocks = layer(bits, group, out_features=1072)  # tiles, and more outputs than one conversion chunk (1024)
    columns = ColumnQuantLinear.from_blocks(blocks, max_rows=8)
    assert columns.qweight.shape[2] == 16
    expected = dequantize(blocks.qweight, blocks.scales, blocks.mins)
    assert torch.equal(dequantize_columns(columns.qweight, columns.scales, columns.mins, torch.float32), expected.t())
    x = torch.randn(5, 256)
    assert torch.allclose(columns(x), torch.nn.functional.linear(x, expected), rtol=1e-5, atol=1e-5)  # eager


def test_compiled_loops_match_the_dequantized_product():
    torch._dynamo.reset()
    torch.manual_seed(0)
    blocks = [layer(8, 32), layer(4, 32), layer(4, 64, out_features=40), layer(8, 32, out_features=36)]  # 36: untiled
    blocks.append(layer(4, 32, out_features=36))
    weights = [dequantize(b.qweight, b.scales, b.mins) for b in blocks]
    layers = [ColumnQuantLinear.from_blocks(b, max_rows=4) for b in blocks]
    compiled = torch.compile(lambda x: [layer(x) + 1 for layer in layers], fullgraph=True)
    for shape in [(1, 1, 256), (2, 1, 256), (4, 1, 256), (5, 1, 256)]:  # loops for 1 to 4 rows, then dequantized
        x = torch.randn(shape)
        for weight, got in zip(weights, compiled(x)):
            expected = torch.nn.functional.linear(x.double(), weight.double()) + 1
            error = (got.double() - expected).abs().max().item()
            assert error < 2e-6 * expected.abs().max().item()  # float32 products summed in another order


def test_tied_embedding_reads_the_output_columns():
    torch.manual_seed(1)
    model = torch.nn.Module()
    model.output = layer(8, 32, out_features=50, in_features=64)
    model.tok_embeddings = QuantEmbedding(model.output.qweight, model.output.scales, None, torch.float32)
    tokens = torch.tensor([[3, 49, 0], [7, 7, 12]])
    expected = model.tok_embeddings(tokens)
    use_column_layers(model, max_rows=1)
    assert isinstance(model.output, ColumnQuantLinear) and isinstance(model.tok_embeddings, ColumnQuantEmbedding)
    assert model.tok_embeddings.qweight is model.output.qweight  # one copy of the table
    assert torch.equal(model.tok_embeddings(tokens), expected)
