"""llama_gen.checkpoint: weights converted one tensor at a time, memory-mapped pages handed back."""

import torch

from llama_gen.checkpoint import convert_weights, release_pages


def test_convert_weights_converts_every_tensor_and_empties_the_source():
    state = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.float32)}
    expected = {k: v.to(torch.bfloat16) for k, v in state.items()}
    same = state["b"]
    converted = convert_weights(state, torch.bfloat16, torch.device("cpu"))
    assert state == {} and set(converted) == {"a", "b"}
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    assert convert_weights({"b": same}, torch.float32, torch.device("cpu"))["b"] is same  # no copy when it fits


def test_release_pages_keeps_the_data():
    t = torch.arange(3 * 4096, dtype=torch.float32)
    release_pages(t)  # anonymous memory: a no-op for the data
    assert torch.equal(t, torch.arange(3 * 4096, dtype=torch.float32))
