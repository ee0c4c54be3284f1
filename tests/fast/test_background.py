"""llama_gen.fast.background: the compiled step built while the model decodes eagerly, then switched to mid-way."""

import time

import pytest
import torch
from test_engine import PROMPTS, build

from llama_gen.fast import FastForward
from llama_gen.fast.background import BackgroundCompile
from llama_gen.serve import Engine

# The same shape as tests/fast/test_aot.py's end-of-cache test: its package (cached on disk) serves both.
SIZES = {"max_seq_len": 40, "max_batch_size": 2}


def test_switch_carries_the_cache_over_mid_generation(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    prompt = torch.tensor([PROMPTS[0][:3], PROMPTS[2][:3]])
    model = build(ckpt, **SIZES).model
    with torch.inference_mode():
        model.forward(prompt[:, :2], 0)  # eagerly: the cache holds two positions per row
        fast = BackgroundCompile(model).switch()
        assert isinstance(fast, FastForward) and fast.compiled and fast.aot is not None
        got = fast(prompt[:, 2:], 2)  # the compiled step goes on from the cache carried over
        want = build(ckpt, **SIZES).model.forward(prompt, 0)[:, -1:]  # eagerly, from scratch
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_engine_answers_eagerly_then_switches_to_the_compiled_step(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    reference = build(ckpt, **SIZES, compile=True)
    expected, _ = reference.generate(PROMPTS[:2], max_gen_len=30, temperature=0)
    del reference
    llama = build(ckpt, **SIZES)
    with Engine(llama, compile_in_background=True) as engine:
        first = [engine.submit(p, temperature=0, max_gen_len=30) for p in PROMPTS[:2]]
        assert [h.result(timeout=120).tokens for h in first] == expected
        if engine.compiling is not None:
            engine.compiling.done.wait(120)
            time.sleep(1)  # the engine switches within its idle wait (0.5 s)
        second = [engine.submit(p, temperature=0, max_gen_len=30) for p in PROMPTS[:2]]
        assert [h.result(timeout=120).tokens for h in second] == expected
        assert engine.compiling is None and isinstance(llama.forward, FastForward) and llama.forward.compiled


def test_background_compile_is_refused_where_it_cannot_run(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    llama = build(ckpt, **SIZES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA_GEN_AOT", "0")  # in-process torch.compile: done up front, not in the background
        with pytest.raises(ValueError, match="background only on CPU"):
            BackgroundCompile(llama.model)
        with Engine(llama, compile_in_background=True) as engine:
            assert engine.compiling is None
