"""The app in this process (httpx's ASGI transport) on a tiny model: a step that raises (say, out of memory) fails its
requests with OpenAI's error JSON, as a 500 or as an error event ending the stream, and the server goes on."""

import asyncio
import json

import httpx
import pytest
from conftest import fail_second_step

from llama_gen.serve import Engine
from llama_gen.server import OpenAIServer

BODY = {"model": "tiny", "prompt": "The weather today is", "temperature": 0, "max_tokens": 12}


@pytest.fixture
def engine(tiny_llama):
    _, llama = tiny_llama
    with Engine(llama) as engine:
        yield engine


def post(engine, body: dict) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=OpenAIServer(engine, "tiny").app())
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=60) as http:
            return await http.post("/v1/completions", json=body)

    return asyncio.run(run())


def test_a_failing_step_is_a_500_with_openai_json_and_the_server_goes_on(engine, monkeypatch):
    fail_second_step(engine, monkeypatch)
    response = post(engine, BODY)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "RuntimeError: out of memory (simulated)" in error["message"]
    assert post(engine, BODY).json()["usage"]["completion_tokens"] == 12


def test_a_failing_step_ends_the_stream_with_an_error_event(engine, monkeypatch):
    fail_second_step(engine, monkeypatch)
    response = post(engine, {**BODY, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "out of memory (simulated)" in json.loads(events[-2])["error"]["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])  # the text before the failure, as chunks
