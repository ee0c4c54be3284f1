"""What every conversion writes (llama_gen.convert.meta_checkpoint): Meta's FFN size parameters and the dtype names."""

import pytest
import torch

from llama_gen.convert.meta_checkpoint import checkpoint_dtype, ffn_params, meta_ffn_hidden


@pytest.mark.parametrize(
    "dim, hidden, expected",
    [
        (4096, 11008, (256, None)),  # Llama 2 7B
        (4096, 14336, (1024, 1.3)),  # Llama 3 8B
        (2048, 8192, (1024, 1.5)),  # Llama 3.2 1B
        (576, 1536, (512, None)),  # SmolLM2 135M
    ],
)
def test_ffn_params_known_models(dim: int, hidden: int, expected: tuple) -> None:
    assert ffn_params(dim, hidden) == expected


def test_ffn_params_reproduce_any_hidden_size() -> None:
    for dim in (8, 64, 96, 576, 960, 2048, 3072, 4096, 5120, 8192):
        for hidden in range(1, 4 * dim, max(1, dim // 37)):
            multiple_of, multiplier = ffn_params(dim, hidden)
            assert meta_ffn_hidden(dim, multiple_of, multiplier) == hidden, (dim, hidden)


def test_checkpoint_dtype_takes_the_device_table_names() -> None:
    assert [checkpoint_dtype(n) for n in ("float32", "bfloat16", "float16")] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ]
    assert [checkpoint_dtype(n) for n in ("fp32", "bf16", "fp16", "half")] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float16,
    ]
    with pytest.raises(ValueError, match="unknown dtype 'float8': use one of float32, .*bfloat16.*float16"):
        checkpoint_dtype("float8")
