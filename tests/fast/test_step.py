"""llama_gen.fast.step: the static-shape decode step (windows over the KV cache) against the eager forward."""

import pytest
from conftest import TINY_CONFIGS
from test_engine import build, random_tokens, stepwise_logits

from llama_gen.fast.forward import FastForward
from llama_gen.fast.layout import fuse_projections
from llama_gen.fast.step import attention_window


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_fused_static_step_matches_eager(tiny_checkpoints, name):
    _, ckpt = tiny_checkpoints[name]
    llama, tokens = build(ckpt), random_tokens(3, 100)
    expected = llama.model.forward(tokens, 0)
    fuse_projections(llama.model)
    assert llama.model.layers[0].attention.wqkv is not None and not hasattr(llama.model.layers[0].attention, "wq")
    assert (llama.model.forward(tokens, 0) - expected).abs().max().item() <= 1e-5
    fast = FastForward(llama.model, compile=False)
    assert (stepwise_logits(fast, tokens, 20) - expected).abs().max().item() <= 1e-4


def test_attention_window_covers_the_position():
    # dynamic windows (CPU): a multiple of 16
    assert [attention_window(p, 2048) for p in (0, 15, 16, 100, 2047)] == [16, 16, 32, 112, 2048]
    assert attention_window(100, 48) == 48
    # static windows (CUDA graphs): a power of two from 64
    assert [attention_window(p, 2048, static=True) for p in (0, 63, 64, 255, 256, 1500)] == [
        64,
        64,
        128,
        256,
        512,
        2048,
    ]
    assert attention_window(100, 48, static=True) == 48
