"""The serving engine on a tiny random model: outputs independent of traffic, cancellation, faults, threads."""

import asyncio
import threading
import time

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, fail_second_step

from llama_gen import Llama
from llama_gen.serve import Engine, QueueFull, RequestCancelled

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village, there lived",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Llamas are",
]


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    return Llama.build(
        ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), max_seq_len=96, max_batch_size=3, device="cpu", dtype="float32"
    )


@pytest.fixture
def engine(llama):
    with Engine(llama, prefill_chunk=4) as engine:
        yield engine


def solo(engine, prompt, **options):
    """The request's completion with nothing else in the engine."""
    assert not engine.admitted and not engine.waiting
    return engine.submit_text(prompt, **options).result(timeout=120)


def test_greedy_outputs_do_not_depend_on_other_traffic(engine, llama):
    alone = {p: solo(engine, p, temperature=0, max_gen_len=12 + i) for i, p in enumerate(PROMPTS)}
    # Twice as many requests as rows, admitted as rows free up, with chunked prefills between decode steps.
    handles = [(p, engine.submit_text(p, temperature=0, max_gen_len=12 + i)) for i, p in enumerate(PROMPTS)]
    handles += [(p, engine.submit_text(p, temperature=0, max_gen_len=12 + i)) for i, p in enumerate(PROMPTS)]
    for prompt, handle in handles:
        done = handle.result(timeout=120)
        assert (done.tokens, done.text, done.finish_reason) == (
            alone[prompt].tokens,
            alone[prompt].text,
            alone[prompt].finish_reason,
        )


def test_greedy_outputs_equal_the_reference_loop(llama):
    reference = [llama.text_completion([p], temperature=0, max_gen_len=16)[0]["generation"] for p in PROMPTS]
    with Engine(llama) as engine:
        handles = [engine.submit_text(p, temperature=0, max_gen_len=16) for p in PROMPTS]
        assert [h.result(timeout=120).text for h in handles] == reference


def test_seeded_sampling_does_not_depend_on_other_traffic(engine):
    alone = solo(engine, PROMPTS[0], temperature=1.0, top_p=0.95, seed=7, max_gen_len=16)
    others = [engine.submit_text(p, temperature=0.8, max_gen_len=20) for p in PROMPTS[1:3]]
    again = engine.submit_text(PROMPTS[0], temperature=1.0, top_p=0.95, seed=7, max_gen_len=16)
    assert again.result(timeout=120).tokens == alone.tokens
    for handle in others:
        handle.result(timeout=120)


def test_interleaved_streams_in_one_thread(engine):
    expected = [solo(engine, p, temperature=0, max_gen_len=10).text for p in PROMPTS[:3]]
    live = [(i, iter(engine.submit_text(p, temperature=0, max_gen_len=10))) for i, p in enumerate(PROMPTS[:3])]
    texts = [""] * 3
    while live:  # one delta from each stream in turn, as a web app serving two users in one thread does
        for item in list(live):
            delta = next(item[1], None)
            if delta is None:
                live.remove(item)
            else:
                texts[item[0]] += delta.text
    assert texts == expected


def wait_until(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_cancel_and_abandon_free_the_row(engine):
    handle = engine.submit_text(PROMPTS[0], temperature=0, max_gen_len=80, stop_token_ids=[[-5]])
    first = next(iter(handle))
    assert first.text or first.n_tokens >= 0
    handle.cancel()
    with pytest.raises(RequestCancelled):
        handle.result(timeout=30)
    stream = iter(engine.submit_text(PROMPTS[1], temperature=0, max_gen_len=80))
    next(stream)
    stream.close()  # leaving the iteration early cancels the request
    wait_until(lambda: not engine.admitted and len(engine.slots.free()) == 3)
    assert solo(engine, PROMPTS[2], temperature=0, max_gen_len=5).completion_tokens == 5


def test_a_step_that_raises_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    fail_second_step(engine, monkeypatch)
    handle = engine.submit_text(PROMPTS[0], temperature=0, max_gen_len=20)
    with pytest.raises(RuntimeError, match="simulated"):
        handle.result(timeout=30)
    wait_until(lambda: len(engine.slots.free()) == 3)
    assert solo(engine, PROMPTS[1], temperature=0, max_gen_len=4).completion_tokens == 4


def test_bad_requests_fail_alone_before_taking_a_row(engine, llama):
    with pytest.raises(ValueError, match="temperature"):
        engine.submit_text("hi", temperature=-1)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit([1] * 200)
    with pytest.raises(ValueError, match="unknown generation option"):
        engine.submit_text("hi", temprature=0)
    assert not engine.waiting and not engine.admitted
    assert solo(engine, "hi", temperature=0, max_gen_len=3).completion_tokens == 3


def test_prefix_reuse_gives_the_same_logits(engine, llama):
    dialog = [{"role": "user", "content": "Tell me about llamas."}]
    first = engine.submit_chat(dialog, temperature=0, max_gen_len=8).result(timeout=60)
    dialog += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And alpacas?"}]
    reused = engine.submit_chat(dialog, temperature=0, max_gen_len=8, logprobs=True).result(timeout=60)
    assert reused.cached_tokens > 0
    with pytest.raises(RuntimeError, match="another thread"):
        Engine(llama)  # one model, one engine at a time
    engine.close()
    with Engine(llama, prefill_chunk=4) as fresh:
        cold = fresh.submit_chat(dialog, temperature=0, max_gen_len=8, logprobs=True).result(timeout=60)
    assert cold.cached_tokens == 0
    assert reused.tokens == cold.tokens
    torch.testing.assert_close(torch.tensor(reused.logprobs), torch.tensor(cold.logprobs), rtol=0, atol=1e-4)


def test_sixteen_threads(engine):
    expected = {p: solo(engine, p, temperature=0, max_gen_len=6).text for p in PROMPTS}
    results, errors = {}, []

    def worker(i):
        try:
            prompt = PROMPTS[i % len(PROMPTS)]
            text = "".join(d.text for d in engine.submit_text(prompt, temperature=0, max_gen_len=6))
            results[i] = (prompt, text)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 16
    assert all(text == expected[prompt] for prompt, text in results.values())


def test_asyncio_clients(engine):
    expected = [solo(engine, p, temperature=0, max_gen_len=6).text for p in PROMPTS[:4]]

    async def client(prompt):
        return "".join([d.text async for d in engine.submit_text(prompt, temperature=0, max_gen_len=6)])

    async def main():
        return await asyncio.gather(*(client(p) for p in PROMPTS[:4]))

    assert asyncio.run(main()) == expected


def test_queue_limit_and_close(llama):
    engine = Engine(llama, max_queue=1)
    handles = []
    with pytest.raises(QueueFull):
        for _ in range(20):
            handles.append(engine.submit_text(PROMPTS[0], temperature=0, max_gen_len=60))
    engine.close()
    for handle in handles:
        with pytest.raises(RequestCancelled):
            handle.result(timeout=30)
