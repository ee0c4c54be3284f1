"""The server on the default model (SmolLM2-135M-Instruct) through the real ``openai`` client: chat and completions,
streamed and not, equal (greedy); usage equal to the Hugging Face tokenizer's counts."""

import openai
import pytest
from live_server import LiveServer

from llama_gen.convert import ensure_default_model

pytestmark = pytest.mark.real_model
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--max_seq_len", "512", "--max_batch_size", "4", "--device", "cpu", "--dtype", "float32"]
    live = LiveServer([*args, "--log_level", "warning"], tmp_path_factory.mktemp("server") / "log.txt")
    yield live
    assert live.stop() == 0, live.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_default_model())  # its tokenizer.json and chat template


def test_chat_streamed_equals_whole_and_usage_is_the_tokenizers(server, client, hf_tokenizer):
    kw = dict(model=server.model, messages=QUESTION, temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = whole.choices[0].message.content
    assert streamed == answer and "Paris" in answer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert chunks[-1].choices == []  # include_usage: a last chunk with the usage (the same counts)
    assert [getattr(chunks[-1].usage, k) for k in counts] == [getattr(whole.usage, k) for k in counts]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the second request reused the first's prefix
    prompt = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(hf_tokenizer.encode(prompt, add_special_tokens=False))
    assert whole.usage.completion_tokens == len(hf_tokenizer.encode(answer, add_special_tokens=False))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_completions_streamed_equals_whole_with_a_stop_string(server, client, hf_tokenizer):
    prompt = "The three primary colours are red,"
    kw = dict(model=server.model, prompt=prompt, temperature=0, max_tokens=12, stop=["."])
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    text = whole.choices[0].text
    assert streamed == text and "." not in text
    assert whole.choices[0].finish_reason == ("stop" if whole.usage.completion_tokens < 12 else "length")
    assert whole.usage.prompt_tokens == len(hf_tokenizer.encode(prompt, add_special_tokens=False))
    assert whole.usage.completion_tokens == len(hf_tokenizer.encode(text, add_special_tokens=False))


def test_models(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
