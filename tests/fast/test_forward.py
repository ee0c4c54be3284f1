"""llama_gen.fast.forward: FastForward (prompts eagerly in chunks, single tokens through the compiled step) against
the eager path."""

import pytest
import torch
from test_engine import PROMPTS, build

from llama_gen import Llama
from llama_gen.fast import aot
from llama_gen.fast import forward as fast_forward
from llama_gen.fast.forward import FastForward
from llama_gen.fast.gemv import GemvLinear
from llama_gen.fast.layout import cpu_weight_layout, fuse_projections
from llama_gen.fast.packed import PackedLinear


def test_prompts_in_chunks_match_one_forward(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(fast_forward, "PREFILL_ROWS", 16)  # 3 prompts: chunks of 5 positions
    _, ckpt = tiny_checkpoints["gqa"]
    llama = build(ckpt)
    torch.manual_seed(2)
    tokens = torch.randint(0, 32000, (3, 23))
    expected = llama.model.forward(tokens, 0)
    chunked = FastForward(llama.model, compile=False)
    assert (chunked(tokens, 0) - expected).abs().max().item() <= 1e-5
    assert (chunked(tokens, 0, last_only=True) - expected[:, -1:]).abs().max().item() <= 1e-5
    assert (chunked(tokens[:, -1:], 23) - llama.model.forward(tokens[:, -1:], 23)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("aot", [True, False], ids=["aot", "torch.compile"])
def test_compiled_greedy_equals_eager(tiny_checkpoints, monkeypatch, aot):
    monkeypatch.setenv("LLAMA_GEN_AOT", "1" if aot else "0")
    _, ckpt = tiny_checkpoints["gqa"]
    eager = build(ckpt)
    fast = build(ckpt, compile=True)
    assert fast.forward is not None and fast.forward.compiled
    assert (fast.forward.aot is not None) == aot
    expected, _ = eager.generate(PROMPTS, max_gen_len=12, temperature=0)  # 5 prompts: batches of 4 and 1
    got, _ = fast.generate(PROMPTS, max_gen_len=12, temperature=0)
    assert got == expected
    assert set(fast.forward.compile_seconds) == {(4, 0), (1, 0)}  # one dynamic-window graph per batch size
    layer = {"packed": PackedLinear, "gemv": GemvLinear, "plain": torch.nn.Linear}[cpu_weight_layout(fast.model)]
    assert any(type(m) is layer for m in fast.model.modules())  # the CPU's layout: Intel packed, else loops
    # logprobs and sampling with a seed go through the same compiled step
    a = eager.text_completion(["Hello"], max_gen_len=6, temperature=0.8, seed=3, logprobs=True)
    b = fast.text_completion(["Hello"], max_gen_len=6, temperature=0.8, seed=3, logprobs=True)
    assert a[0]["generation"] == b[0]["generation"]
    assert torch.allclose(torch.tensor(a[0]["logprobs"]), torch.tensor(b[0]["logprobs"]), atol=1e-4)


def test_generations_of_other_lengths_reuse_the_compiled_graphs(tiny_checkpoints, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LLAMA_GEN_AOT", "0")  # counts torch.compile's graphs (an AOT package has every window)

    _, ckpt = tiny_checkpoints["gqa"]
    fast = build(ckpt, compile=True, max_batch_size=2)
    fast.forward.warm_up((1, 2), max_pos=60)
    compiled = counters["stats"]["unique_graphs"]
    for prompts, n in [(PROMPTS[:2], 5), (PROMPTS[:2], 9), (PROMPTS[:1], 7), (PROMPTS[1:3], 11)]:
        fast.generate(prompts, max_gen_len=n, temperature=0)
    assert counters["stats"]["unique_graphs"] == compiled  # token columns of any stride, any length: no recompile


def test_failed_ahead_of_time_build_falls_back_to_torch_compile(tiny_checkpoints, monkeypatch):
    def failing_build(spec):
        raise aot.AotBuildError("building the decode step ahead of time failed (exit 1)")

    monkeypatch.setenv("LLAMA_GEN_AOT", "1")
    monkeypatch.setattr(aot, "ensure_package", failing_build)
    _, ckpt = tiny_checkpoints["gqa"]
    fast = build(ckpt, compile=True, max_batch_size=1)
    expected, _ = build(ckpt, max_batch_size=1).generate(PROMPTS[:1], max_gen_len=8, temperature=0)
    with pytest.warns(UserWarning, match="in-process with torch.compile instead"):
        got, _ = fast.generate(PROMPTS[:1], max_gen_len=8, temperature=0)
    assert got == expected and fast.forward.aot is None


@pytest.mark.real_model
def test_default_model_fast_path_greedy_equals_eager():
    llama = Llama.build(max_seq_len=256, max_batch_size=3, device="cpu", dtype="float32")
    prompts = [
        llama.tokenizer.encode(p, bos=False, eos=False)
        for p in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ]
    expected, _ = llama.generate(prompts, max_gen_len=24, temperature=0)
    fuse_projections(llama.model)
    llama = Llama(
        llama.model, llama.tokenizer, llama.generation_config, forward=FastForward(llama.model, compile=False)
    )
    got, _ = llama.generate(prompts, max_gen_len=24, temperature=0)
    assert got == expected
