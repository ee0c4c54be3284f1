"""Stop strings and token sequences, seeds, finish reasons and streaming through the public API."""

import pytest

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time, in a land far away,", "1, 2, 3,"]


def test_stop_string_across_tokens_stops_only_that_sequence(tiny_llama):
    _, llama = tiny_llama
    plain = llama.text_completion(PROMPTS, max_gen_len=16, temperature=0, logprobs=True)
    target = plain[2]
    pieces = target["tokens"]
    # A stop string made of the tail of token 3 and the head of token 5 spans three tokens.
    prefix = "".join(pieces[:3])
    text = target["generation"]
    assert text.startswith(prefix)
    start = len(prefix) - 1 if pieces[2] else len(prefix)
    end = len("".join(pieces[:5])) - 0
    stop = text[start:end]
    assert len(stop) >= 2 and text.find(stop) == start, "pick a stop string that first occurs here"

    stopped = llama.text_completion(PROMPTS, max_gen_len=16, temperature=0, stop=stop, logprobs=True)
    assert stopped[2]["generation"] == text[:start]
    assert stopped[2]["finish_reason"] == "stop"
    assert stop not in stopped[2]["generation"]
    assert len(stopped[2]["tokens"]) == len(stopped[2]["logprobs"]) <= 3
    for i in (0, 1, 3):  # the other sequences keep going, unchanged
        if stop not in plain[i]["generation"]:
            assert stopped[i] == plain[i]


def test_stop_token_sequence(tiny_llama):
    _, llama = tiny_llama
    prompt = [[1, 450, 4996, 17354]]
    tokens, _ = llama.generate(prompt, max_gen_len=12, temperature=0)
    seq = tokens[0][4:6]
    out, _ = llama.generate(prompt, max_gen_len=12, temperature=0, stop_token_ids=[seq])
    expected = tokens[0][:4]
    # The sequence may also occur earlier, in which case the cut comes there.
    for i in range(len(tokens[0]) - 1):
        if tokens[0][i : i + 2] == seq:
            expected = tokens[0][:i]
            break
    assert out[0] == expected


def test_finish_reasons(tiny_llama):
    _, llama = tiny_llama
    out = llama.text_completion(["Hello"], max_gen_len=3, temperature=0)
    assert out[0]["finish_reason"] == "length"
    first = llama.generate([[1, 15043]], max_gen_len=6, temperature=0)[0][0]
    llama_eos = llama.eos_ids
    try:
        llama.eos_ids = [first[2]]
        tokens, _ = llama.generate([[1, 15043]], max_gen_len=6, temperature=0)
        assert tokens[0] == first[: first.index(first[2])]
    finally:
        llama.eos_ids = llama_eos


def test_seed_reproducible_across_calls(tiny_llama):
    _, llama = tiny_llama
    kwargs = dict(max_gen_len=20, temperature=1.0, top_p=1.0)
    a = llama.text_completion(PROMPTS, seed=1234, **kwargs)
    llama.text_completion(PROMPTS, **kwargs)  # consumes the global RNG in between
    llama.generate([[1, 2, 3]], max_gen_len=5, temperature=0.8)
    b = llama.text_completion(PROMPTS, seed=1234, **kwargs)
    c = llama.text_completion(PROMPTS, seed=4321, **kwargs)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "controls",
    [
        dict(top_k=5),
        dict(min_p=0.1),
        dict(repetition_penalty=1.3),
        dict(top_k=3, top_p=0.5, min_p=0.05, repetition_penalty=1.1),
    ],
)
def test_controls_accepted_everywhere(tiny_llama, controls):
    _, llama = tiny_llama
    dialog = [{"role": "user", "content": "hi"}]
    llama.generate([[1, 15043]], max_gen_len=3, temperature=0.7, seed=1, **controls)
    llama.text_completion(["hi"], max_gen_len=3, temperature=0.7, seed=1, **controls)
    llama.chat_completion([dialog], max_gen_len=3, temperature=0.7, seed=1, **controls)
    list(llama.stream_text_completion(["hi"], max_gen_len=3, temperature=0.7, seed=1, **controls))
    list(llama.stream_chat_completion([dialog], max_gen_len=3, temperature=0.7, seed=1, **controls))


def test_repetition_penalty_changes_greedy_output(tiny_llama):
    _, llama = tiny_llama
    plain = llama.generate([[1, 15043]], max_gen_len=30, temperature=0)[0][0]
    penalized = llama.generate([[1, 15043]], max_gen_len=30, temperature=0, repetition_penalty=5.0)[0][0]
    assert len(set(penalized)) >= len(set(plain))


@pytest.mark.parametrize(
    "bad",
    [
        dict(top_k=-1),
        dict(min_p=1.0),
        dict(repetition_penalty=0.0),
        dict(stop=[""]),
        dict(seed="x"),
        dict(max_gen_len=-2),
    ],
)
def test_bad_controls_raise(tiny_llama, bad):
    _, llama = tiny_llama
    with pytest.raises(ValueError):
        llama.text_completion(["hi"], **bad)
    with pytest.raises(ValueError):
        llama.stream_text_completion(["hi"], **bad)  # raised at the call, before iterating


def test_batched_stream_concatenates_to_completion(tiny_llama):
    _, llama = tiny_llama
    kwargs = dict(max_gen_len=14, temperature=0, stop=["the"])
    full = llama.text_completion(PROMPTS + PROMPTS[:2], **kwargs)  # 6 prompts > max_batch_size
    texts = [""] * len(full)
    reasons = [None] * len(full)
    for step in llama.stream_text_completion(PROMPTS + PROMPTS[:2], **kwargs):
        for chunk in step:
            assert reasons[chunk.index] is None, "no text after a sequence finished"
            texts[chunk.index] += chunk.text
            reasons[chunk.index] = chunk.finish_reason
    assert texts == [p["generation"] for p in full]
    assert reasons == [p["finish_reason"] for p in full]


def test_breaking_out_of_a_stream_stops_compute(tiny_llama, monkeypatch):
    _, llama = tiny_llama
    calls = []
    forward = llama.forward  # what the loop runs the model with
    monkeypatch.setattr(llama, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    stream = llama.stream_text_completion(["Hello"], max_gen_len=50, temperature=0)
    for _ in stream:
        break
    made = len(calls)
    stream.close()
    assert 1 <= made <= 2 and len(calls) == made
