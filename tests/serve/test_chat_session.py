"""The library's chat session: on an engine each turn reuses the conversation's cache; replies as the plain loop's."""

import pytest
from conftest import LLAMA2_TOKENIZER

from llama_gen import Llama
from llama_gen.serve import Engine
from llama_gen.serve.chat import ChatSession

TURNS = ["Tell me about llamas.", "And alpacas?", "Which one is bigger?", "Thanks!"]


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    return Llama.build(
        ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), max_seq_len=160, max_batch_size=2, device="cpu", dtype="float32"
    )


def test_turns_reuse_the_cache_and_reply_as_the_reference_loop(llama):
    plain = ChatSession(llama, max_gen_len=12, system="Be brief.", temperature=0)
    expected = [plain.reply(text) for text in TURNS]
    with Engine(llama) as engine:
        session = ChatSession(llama, max_gen_len=12, system="Be brief.", engine=engine, temperature=0)
        previous = None
        for turn, text in enumerate(TURNS):
            assert session.reply(text) == expected[turn]
            done = session.handle.result()
            if previous is None:
                assert done.cached_tokens == 0
            else:  # the previous turn stays in the row: its prompt at least (its reply too, where the reply's text
                # encodes back to the tokens sampled; a random model's byte soup often does not)
                assert done.cached_tokens >= previous.prompt_tokens - 2
            previous = done
    assert session.history == plain.history


def test_history_in_reply_and_history_out(llama):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    session = ChatSession(llama, max_gen_len=6, history=history, temperature=0)
    pieces = list(session.send("How are you?"))
    assert session.history[:2] == history and session.history[2] == {"role": "user", "content": "How are you?"}
    assert session.history[3]["content"] == "".join(pieces)
    with pytest.raises(ValueError, match="needs"):
        session.send("word " * 400)  # refused before any work, history untouched
    assert len(session.history) == 4


def test_a_stream_left_early_keeps_the_reply_so_far(llama):
    with Engine(llama) as engine:
        session = ChatSession(llama, max_gen_len=40, engine=engine, temperature=0)
        stream = session.send("Tell me a long story.")
        first = next(stream)
        stream.close()
        assert session.history[-1]["content"] == first
        assert session.reply("Shorter, please.")  # the session goes on
