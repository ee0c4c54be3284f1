"""The HTTP server on a tiny random model, one real server process and real clients (openai, httpx): concurrent
streams, clients that leave mid-stream, the bad-input matrix, auth, logprobs, n, metrics, 429, the window, and
last SIGTERM (requests in flight finish or are cut at the deadline, new connections are refused, exit status 0)."""

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import LLAMA2_TOKENIZER
from live_server import LiveServer, tiny_server_args
from prometheus_client.parser import text_string_to_metric_families

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_QUEUE = 100
N = 12  # tokens per reply in the concurrency test
WINDOW = 4096  # max_seq_len
DRAIN_S = 1.5
PROMPTS = [
    "The weather today is",
    "import numpy as np",
    "Dear diary, this morning I",
    "A, B, C, D,",
    "Roses are red,",
    "The best way to cook rice",
    "Chapter one:",
    "Ten reasons to visit Paris:",
]


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    _, ckpt = tiny_checkpoints["gqa"]
    args = tiny_server_args(ckpt, LLAMA2_TOKENIZER, "--max_seq_len", str(WINDOW), "--max_batch_size", "8")
    args += ["--max_queue", str(MAX_QUEUE), "--max_body_bytes", "40000", "--drain_timeout", str(DRAIN_S)]
    # the key from the environment variable (the --api_key flag sets the same thing)
    live = LiveServer(args, tmp_path_factory.mktemp("server") / "log.txt", env={"LLAMA_GEN_API_KEY": KEY})
    yield live
    assert live.stop() == 0, live.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def idle(server) -> bool:
    health = httpx.get(server.url + "/health").json()
    return health["active_slots"] == 0 and health["queue_depth"] == 0


def wait_until_idle(server, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not idle(server):
        assert time.monotonic() < end, httpx.get(server.url + "/health").json()
        time.sleep(0.02)


def test_concurrent_streaming_clients_each_equal_their_solo_output(server, client):
    def solo(kind: str, prompt: str) -> str:
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=N)
            return reply.choices[0].message.content
        return client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=N).choices[0].text

    jobs = [("chat" if i % 2 else "text", PROMPTS[i % len(PROMPTS)]) for i in range(32)]
    expected = {job: solo(*job) for job in set(jobs)}
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def stream(kind: str, prompt: str) -> str:
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            chunks = await aclient.chat.completions.create(
                model="tiny", messages=messages, temperature=0, max_tokens=N, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        chunks = await aclient.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=N, stream=True)
        return "".join([c.choices[0].text async for c in chunks])

    async def all_at_once() -> list[str]:
        async with aclient:
            return await asyncio.gather(*(stream(*job) for job in jobs))

    outputs = asyncio.run(all_at_once())
    assert outputs == [expected[job] for job in jobs]
    wait_until_idle(server)


def test_clients_leaving_mid_stream_free_every_slot_and_the_next_request_is_served_at_once(server):
    body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0.8, "stream": True}

    async def leave(i: int, http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/completions", json={**body, "seed": i}, headers=AUTH) as response:
            assert response.status_code == 200
            if i % 3:  # a third leave before any token (some still waiting for a slot), the rest after one
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break

    async def hundred_clients() -> None:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as http:
            await asyncio.gather(*(leave(i, http) for i in range(100)))

    asyncio.run(hundred_clients())
    wait_until_idle(server, timeout=5)
    start = time.perf_counter()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "max_tokens": 4}, headers=AUTH) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["finish_reason"] in (None, "length", "stop")
    assert time.perf_counter() - start < 2.0  # nothing left in front of it
    cancelled = metric(server, "llama_gen_generations_total", finish_reason="cancelled")
    assert cancelled >= 50  # most of the hundred were cut short (a few may have finished first)


def test_a_non_streaming_client_that_leaves_has_its_request_cancelled(server):
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 3000, "temperature": 0}  # (tens of seconds)
    cancelled = metric(server, "llama_gen_generations_total", finish_reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=1.0)
    wait_until_idle(server, timeout=5)
    assert metric(server, "llama_gen_generations_total", finish_reason="cancelled") == cancelled + 1


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    assert name in text, text  # the family is there; this label set has not been counted yet
    return 0.0


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD_INPUTS = [  # (what, path, body or raw bytes, headers, status, words of the message)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', AUTH, 400, "not valid JSON"),
    ("not an object", "/v1/completions", b"[1, 2]", AUTH, 400, "must be a JSON object"),
    ("wrong type", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, AUTH, 400, "temperature: Input should"),
    ("bool as int", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": True}, AUTH, 400, "max_tokens"),
    ("prompt type", "/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, AUTH, 400, "prompt: must be a string"),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, AUTH, 400, "messages: List should have"),
    (
        "unknown role",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        AUTH,
        400,
        "role 'wizard'",
    ),  # fmt: skip
    ("no content", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, AUTH, 400, "content: required"),
    (
        "image part",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        AUTH,
        400,
        "only text parts",
    ),  # fmt: skip
    ("negative max_tokens", "/v1/chat/completions", {**CHAT, "max_tokens": -1}, AUTH, 400, "max_tokens: Input should"),
    ("top_p 2", "/v1/chat/completions", {**CHAT, "top_p": 2}, AUTH, 400, "top_p must be in (0, 1]"),
    ("n 0", "/v1/completions", {"model": "tiny", "prompt": "a", "n": 0}, AUTH, 400, "n: Input should"),
    ("unknown parameter", "/v1/chat/completions", {**CHAT, "tools": []}, AUTH, 400, "tools: unknown parameter"),
    ("unsupported penalty", "/v1/chat/completions", {**CHAT, "presence_penalty": 1}, AUTH, 400, "repetition_penalty"),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": "word " * 4200}, AUTH, 400, "max_seq_len"),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-4"}, AUTH, 404, "'gpt-4' does not exist"),
    ("oversized body", "/v1/completions", {"model": "tiny", "prompt": "x" * 50000}, AUTH, 413, "limit of 40000 bytes"),
    ("missing key", "/v1/chat/completions", CHAT, {}, 401, "no API key given"),
    ("wrong key", "/v1/chat/completions", CHAT, {"Authorization": "Bearer nope"}, 401, "wrong API key"),
    ("key on /metrics too", "/metrics", None, {}, 401, "no API key given"),
    ("unknown endpoint", "/v1/embeddings", CHAT, AUTH, 404, "the endpoints are"),
]


@pytest.mark.parametrize(
    ("what", "path", "body", "headers", "status", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_a_4xx_with_a_clear_message_and_the_server_goes_on(
    server, what, path, body, headers, status, words
):
    with httpx.Client(base_url=server.url, headers=headers) as http:
        if body is None:
            response = http.get(path)
        elif isinstance(body, bytes):
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
        assert "Traceback" not in response.text
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}, headers=AUTH)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_health_is_open_the_rest_needs_the_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == WINDOW


def test_logprobs_equal_the_reference_model(server, client, tiny_checkpoints):
    hf, _ = tiny_checkpoints["gqa"]
    prompt = [1, 450, 7483, 310, 3444, 338]  # token ids: "The capital of France is"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    ids = [*prompt, *(tok for tok in _greedy_ids(hf, prompt, 6))]
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    got = out.choices[0].logprobs
    assert len(got.token_logprobs) == out.usage.completion_tokens == 6
    for i, (lp, top) in enumerate(zip(got.token_logprobs, got.top_logprobs)):
        row = reference[len(prompt) - 1 + i]
        best = row.topk(3).values.tolist()
        assert lp == pytest.approx(best[0], abs=1e-3)  # greedy: the chosen token is the likeliest
        # (top_logprobs maps token text to logprob: two ids with the same text share an entry)
        assert top and all(min(abs(v - b) for b in best) < 1e-3 for v in top.values()), (top, best)


def _greedy_ids(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt) :].tolist()


def test_chat_logprobs_n_and_seed(server, client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    kw = dict(model="tiny", messages=messages, max_tokens=8, temperature=1.0, seed=5, n=3)
    one, two = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in one.choices]
    assert [c.index for c in one.choices] == [0, 1, 2] and texts == [c.message.content for c in two.choices]
    assert len(set(texts)) > 1  # choice i draws with seed + i
    single = client.chat.completions.create(**{**kw, "n": 1})
    assert single.choices[0].message.content == texts[0]
    assert one.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy


def test_top_k_min_p_and_repetition_penalty_extensions(client):
    def text(**kw) -> str:
        out = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=10, extra_body=kw, seed=3)
        return out.choices[0].text

    greedy = text(temperature=0, repetition_penalty=0.2)
    assert text(temperature=1.5, top_k=1, repetition_penalty=0.2) == greedy  # top_k 1: the argmax, penalized
    assert text(temperature=0) != greedy  # (a penalty < 1 favours tokens already seen)
    assert text(temperature=1.5, min_p=0.999, repetition_penalty=0.2) == greedy  # only the likeliest survives


def test_a_full_queue_gets_429_with_retry_after(server):
    wait_until_idle(server)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 50, "n": 128}  # more than max_queue + the slots
    response = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 429 and response.headers["Retry-After"] == "1", response.text
    assert "busy" in response.json()["error"]["message"]
    wait_until_idle(server)  # the choices already queued were cancelled


def test_max_tokens_is_clipped_to_the_window(client):
    prompt = [1] + [450] * (WINDOW - 10)  # token ids: 10 positions left
    reply = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=1000)
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (WINDOW - 9, 9)


def stream_lines(url: str, body: dict, lines: list[str], started: threading.Event) -> None:
    """Reads one streamed completion into lines (an error ends with its repr)."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except httpx.HTTPError as error:
        lines.append(repr(error))
    started.set()


def test_sigterm_finishes_short_requests_cuts_long_ones_at_the_deadline_and_exits_0(server):
    """The last test here: it stops the module's server."""
    base = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "stream": True}
    short, long = [], []
    started = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=stream_lines, args=(server.url, {**base, "max_tokens": 3000}, long, started[0])),
        threading.Thread(target=stream_lines, args=(server.url, {**base, "max_tokens": 10}, short, started[1])),
    ]
    for thread, event in zip(threads, started):
        thread.start()
        assert event.wait(30)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no new connections once it drains
        httpx.get(server.url + "/health")
    for thread in threads:
        thread.join(30)
    assert time.monotonic() - start < DRAIN_S + 2.0  # both streams over: the long one cut at the deadline
    assert server.proc.wait(30) == 0, server.log()  # (the interpreter's exit with torch loaded takes seconds more)
    assert short[-1] == "data: [DONE]" and json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert long[-1] == "data: [DONE]", long[-3:]  # cut, but as a well-formed stream
    assert "shut down before the answer was complete" in json.loads(long[-2][6:])["error"]["message"]
