import random

import pytest
from test_tokenizer import LLAMA2, LLAMA3, MIXED, write_hf_tokenizer

from llama_gen.detokenize import IncrementalDecoder
from llama_gen.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

TEXTS = [MIXED, " leading space\n\n  and   gaps", "ŝ€¢ 🦙🦙🦙 Ωmega 日本語のテキスト"]


@pytest.fixture(scope="module", params=["sentencepiece", "tiktoken", "hf"])
def tok(request, tmp_path_factory) -> Tokenizer:
    if request.param == "sentencepiece":
        return load_tokenizer(LLAMA2)
    if request.param == "tiktoken":
        return load_tokenizer(LLAMA3)
    return HFTokenizer(write_hf_tokenizer(tmp_path_factory.mktemp("hf")))  # GPT-2-style byte-level BPE


def stream(tok: Tokenizer, ids: list[int], chunk: int = 1, prompt: list[int] = ()) -> list[str]:
    """Returns the deltas of streaming ids chunk at a time, the flush included last."""
    dec = IncrementalDecoder(tok, prompt)
    deltas = [dec.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [dec.flush()]
    assert dec.text == "".join(deltas)
    return deltas


def check(tok: Tokenizer, ids: list[int], chunk: int) -> None:
    deltas = stream(tok, ids, chunk)
    expected = tok.decode(ids)
    assert "".join(deltas) == expected, (ids, deltas)
    if "\ufffd" not in expected:
        assert not any("\ufffd" in d for d in deltas), (ids, deltas)


def test_every_prefix_matches_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert tok.decode(ids) == text
        for k in range(len(ids) + 1):
            for chunk in (1, 2, 3, len(ids) or 1):
                check(tok, ids[:k], chunk)


def test_random_ids_match_decode(tok):
    rng = random.Random(0)
    # For sentencepiece, favour the byte-fallback pieces <0x00>..<0xFF> (ids 3..258) and "▁" (29871).
    pool = list(range(3, 259)) + [29871, 0, 1, 2] if tok.kind == "sentencepiece" else []
    for _ in range(400):
        ids = [
            rng.choice(pool) if pool and rng.random() < 0.6 else rng.randrange(tok.n_words)
            for _ in range(rng.randint(0, 16))
        ]
        check(tok, ids, rng.randint(1, 4))


def test_no_fffd_held_until_complete(tok):
    ids = tok.encode("🦙", bos=False, eos=False)
    assert len(ids) > 1  # the emoji is split over several tokens in every vocabulary here
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "🦙" and dec.flush() == ""

    dec = IncrementalDecoder(tok)
    assert dec.push(ids[:-1]) == ""
    tail = dec.flush()  # the ids really end in an incomplete character
    assert tail == tok.decode(ids[:-1]) and tail.endswith("\ufffd")
    with pytest.raises(ValueError, match="after flush"):
        dec.push(ids[-1])


def test_prompt_context(tok):
    prompt = tok.encode("The answer is", bos=True, eos=False)
    # What a model generates after the prompt: sentencepiece's dummy prefix supplies the space ("▁42").
    gen = tok.encode(
        "42, naïve 🦙 friend" if tok.kind == "sentencepiece" else " 42, naïve 🦙 friend", bos=False, eos=False
    )
    for chunk in (1, 3):
        deltas = stream(tok, gen, chunk, prompt)
        full, head = tok.decode(prompt + gen), tok.decode(prompt)
        assert full.startswith(head) and "".join(deltas) == full[len(head) :]
        assert "".join(deltas).startswith(" 42")  # the prompt gives the first token its leading space
    # Without a prompt the deltas add up to decode(generated ids), as Meta's reference returns them.
    without = "".join(stream(tok, gen))
    assert without == tok.decode(gen)
    assert without == ("42, naïve 🦙 friend" if tok.kind == "sentencepiece" else " 42, naïve 🦙 friend")


def test_llama2_chat_answer_streams_like_reference():
    from llama_gen.chat_format import get_chat_format

    tok = load_tokenizer(LLAMA2)
    prompt = get_chat_format("llama2").encode_dialog(tok, [{"role": "user", "content": "Hi"}])
    answer = tok.encode("Hello! 你好 🦙", bos=False, eos=True)  # as a model would generate it, eos included
    assert "".join(stream(tok, answer)) == tok.decode(answer) == "Hello! 你好 🦙"
    assert "".join(stream(tok, answer, prompt=prompt)) == " Hello! 你好 🦙"


def test_push_accepts_ints_and_sequences_and_pad(tok):
    ids = tok.encode(MIXED, bos=False, eos=False)
    dec = IncrementalDecoder(tok)
    text = dec.push(ids[0]) + dec.push(tuple(ids[1:5])) + dec.push(ids[5:]) + dec.push([-1]) + dec.flush()
    assert text == tok.decode(ids)


def test_window_stays_small():
    tok = load_tokenizer(LLAMA2)
    longest = 0

    class Counting:
        def decode(self, ids, skip_special_tokens=False):
            nonlocal longest
            longest = max(longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    prompt = tok.encode("a long prompt " * 50, bos=True, eos=False)
    ids = tok.encode(MIXED * 40, bos=False, eos=False)
    dec = IncrementalDecoder(Counting(), prompt_ids=prompt)
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert len(ids) > 1500 and out == " " + tok.decode(ids)
    assert longest <= 10  # a 4-byte emoji is 4 byte tokens; never the whole sequence
