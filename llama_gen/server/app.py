"""The HTTP app: OpenAI's endpoints on a serving engine (Starlette; streams as Server-Sent Events).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{id}]   GET /health   GET /metrics

Every choice of every request is one engine request, so all clients share the engine's decode steps (continuous
batching). A streaming client that goes away has its requests cancelled at once (their slots are free after the
engine's next step); so has a waiting non-streaming one. Bad input gets a 4xx with OpenAI's error JSON, a full queue
429 with Retry-After, a server shutting down 503; an unexpected error a 500 with the same JSON (the traceback goes
to the server's log, never to the client).
"""

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_gen.serve import Completion, Delta, Engine, EngineClosed, QueueFull, RequestCancelled, RequestHandle
from llama_gen.server import protocol
from llama_gen.server.metrics import Metrics
from llama_gen.server.protocol import APIError, ChatCompletionRequest, CompletionRequest

OPEN_PATHS = ("/health",)  # answered without the API key
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
RETRY_AFTER_S = 1


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# ---- what differs between the two endpoints: the shape of a choice ----------------------------------------------
class ChatShape:
    kind, chunk_kind, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    @staticmethod
    def first(index: int, prefix: str) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def delta(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return {
            "index": index,
            "delta": {"content": text} if text else {},
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    @staticmethod
    def final(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    @staticmethod
    def logprobs(pieces: list[str], logprobs: list[float], tops: list, offset: int) -> dict:
        return protocol.chat_logprobs(pieces, logprobs, tops)


class CompletionShape:
    kind, chunk_kind, id_prefix = "text_completion", "text_completion", "cmpl"

    @staticmethod
    def first(index: int, prefix: str) -> dict | None:  # the echoed prompt, if any
        return {"index": index, "text": prefix, "logprobs": None, "finish_reason": None} if prefix else None

    @staticmethod
    def delta(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    final = delta

    @staticmethod
    def logprobs(pieces: list[str], logprobs: list[float], tops: list, offset: int) -> dict:
        return protocol.completion_logprobs(pieces, logprobs, tops, offset)


@dataclass
class Call:
    """One API call: its engine requests (n per prompt, prompt by prompt) and how to answer it."""

    shape: type[ChatShape] | type[CompletionShape]
    handles: list[RequestHandle]
    n: int  # choices per prompt
    logprobs: bool
    include_usage: bool = False
    prefixes: list[str] = field(default_factory=list)  # per choice: the echoed prompt ("" without echo)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = protocol.new_id(self.shape.id_prefix)
        self.prefixes = self.prefixes or [""] * len(self.handles)


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Delta]]:
    """Yields (index, delta) of every handle as they come; leaving early (or failing) cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for delta in handle:
                queue.put_nowait((index, delta, None))
            queue.put_nowait((index, None, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, error))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(handles)
        while running:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                running -= 1
            else:
                yield index, delta
    finally:
        for handle, task in zip(handles, tasks):
            handle.cancel()  # (nothing for a finished one)
            task.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (to be raced against the work; the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIServer:
    """OpenAI's API on one engine. ``defaults``: generation options for parameters a request leaves out (the
    server's flags); ``api_key``: required as a bearer token on everything but /health; ``max_body_bytes``: larger
    request bodies get 413."""

    def __init__(
        self, engine: Engine, model_name: str, defaults: dict | None = None, api_key: str | None = None,
        max_body_bytes: int = 1 << 20,
    ) -> None:  # fmt: skip
        self.engine, self.model_name, self.defaults = engine, model_name, dict(defaults or {})
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.tokenizer = engine.llama.tokenizer
        self.metrics = Metrics(engine)
        self.draining = False  # set on SIGTERM: new generations get 503
        self.created = int(time.time())

    def app(self) -> Starlette:
        """Returns the ASGI app."""
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        handlers = {APIError: self.api_error, HTTPException: self.http_error, Exception: self.internal_error}
        app = Starlette(routes=routes, exception_handlers=handlers)
        return Frontdoor(app, self.api_key, self.metrics)

    # ---- endpoints --------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = protocol.parse_body(await self.read_body(request), ChatCompletionRequest)
        self.check_model(body.model)
        options, dialog = body.options(self.defaults), body.dialog()
        if body.logprobs:
            options.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
        handles = self.submit([lambda o: self.engine.submit_chat(dialog, **o)], options, body.n, "messages")
        call = Call(ChatShape, handles, body.n, body.logprobs, body.include_usage)
        return await self.answer(request, call, body.stream)

    async def completions(self, request: Request) -> Response:
        body = protocol.parse_body(await self.read_body(request), CompletionRequest)
        self.check_model(body.model)
        options = body.options(self.defaults)
        if body.logprobs is not None:
            options.update(logprobs=True, top_logprobs=body.logprobs)
        submits = [self.text_submitter(p) for p in body.prompt]
        handles = self.submit(submits, options, body.n, "prompt")
        prefixes = [self.prompt_text(p) if body.echo else "" for p in body.prompt for _ in range(body.n)]
        call = Call(CompletionShape, handles, body.n, body.logprobs is not None, body.include_usage, prefixes)
        return await self.answer(request, call, body.stream)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        status = "draining" if self.draining else "ok"
        counts = {"active_slots": len(self.engine.admitted), "queue_depth": len(self.engine.waiting)}
        return JSONResponse({"status": status, "model": self.model_name, **counts}, 503 if self.draining else 200)

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # ---- requests in ----------------------------------------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        """Returns the request's body; raises APIError 413 past max_body_bytes (without reading on when the
        Content-Length says so), 503 while draining."""
        if self.draining:
            raise self.shutting_down()
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is over the server's limit of {limit} bytes: send less")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            message = f"the model {name!r} does not exist: this server serves {self.model_name!r} (GET /v1/models)"
            raise APIError(404, message, param="model", code="model_not_found")

    def text_submitter(self, prompt: str | list[int]) -> Callable[[dict], RequestHandle]:
        if isinstance(prompt, str):
            return lambda options: self.engine.submit_text(prompt, **options)
        return lambda options: self.engine.submit(prompt, **options)

    def prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def submit(self, submits: list[Callable[[dict], RequestHandle]], options: dict, n: int, param: str) -> list:
        """Returns the handles of n engine requests per submit function (choice i of a seeded request: seed + i).
        If one is refused, those already made are cancelled and the refusal raised as an APIError."""
        handles: list[RequestHandle] = []
        where = param
        try:
            for p, submit in enumerate(submits):
                where = f"{param}[{p}]" if len(submits) > 1 else param
                for i in range(n):
                    seed = options.get("seed")
                    seeded = {"seed": (seed + i + 2**63) % 2**64 - 2**63} if seed is not None and i else {}
                    handles.append(submit({**options, **seeded}))
        except BaseException as error:
            for handle in handles:
                handle.cancel()
            if isinstance(error, ValueError):
                raise APIError(400, f"{where}: {error}", param=where) from None
            if isinstance(error, QueueFull):
                headers = {"Retry-After": str(RETRY_AFTER_S)}
                raise APIError(429, f"the server is busy: {error}", "rate_limit_error", headers=headers) from None
            if isinstance(error, EngineClosed):
                raise self.shutting_down() from None
            raise
        for handle in handles:
            self.metrics.prompt_tokens.inc(handle.prompt_tokens)
        return handles

    # ---- answers out --------------------------------------------------------------------------------------------
    async def answer(self, request: Request, call: Call, stream: bool) -> Response:
        if stream:
            return EventStream(self.events(call), lambda: self.account(call.handles, cancel=True))
        try:
            done = await self.wait(request, call.handles)
        finally:
            self.account(call.handles)
        choices = []
        for i, (c, prefix) in enumerate(zip(done, call.prefixes)):
            logprobs = (
                self.logprobs(call.shape, c.tokens, c.logprobs, c.top_logprobs, len(prefix)) if call.logprobs else None
            )
            choices.append(call.shape.final(i, prefix + c.text, logprobs, protocol.finish_reason(c.finish_reason)))
        head = protocol.envelope(call.id, call.shape.kind, self.model_name, call.created)
        return JSONResponse({**head, "choices": choices, "usage": protocol.usage(done[:: call.n], done)})

    async def wait(self, request: Request, handles: list[RequestHandle]) -> list[Completion]:
        """Returns every handle's Completion, or raises APIError (the client left: 499; shut down: 503; failed: 500),
        cancelling the unfinished ones."""
        work = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "the client closed the connection before the answer was ready")
            return work.result()
        except RequestCancelled:
            raise self.shutting_down() from None
        except APIError:
            raise
        except Exception as error:  # noqa: BLE001 - a failed step: the engine goes on, this request fails
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error") from None
        finally:
            gone.cancel()
            work.cancel()
            for handle in handles:
                handle.cancel()

    async def events(self, call: Call) -> AsyncIterator[str]:
        """Yields the Server-Sent Events of a streamed answer: OpenAI's chunks, then ``data: [DONE]``. A request
        that fails midway ends with an error event (OpenAI's error JSON)."""
        head = protocol.envelope(call.id, call.shape.chunk_kind, self.model_name, call.created)

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            extra = {"usage": usage} if call.include_usage else {}
            return f"data: {json.dumps({**head, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

        for i, prefix in enumerate(call.prefixes):
            if (first := call.shape.first(i, prefix)) is not None:
                yield chunk([first])
        seen, offsets = [0] * len(call.handles), [len(p) for p in call.prefixes]
        try:
            async for i, delta in merged(call.handles):
                logprobs = None
                if call.logprobs:
                    ids, lps, tops = call.handles[i].kept(seen[i], delta.n_tokens)
                    logprobs = self.logprobs(call.shape, ids, lps, tops, offsets[i])
                seen[i], offsets[i] = max(seen[i], delta.n_tokens), offsets[i] + len(delta.text)
                yield chunk([call.shape.delta(i, delta.text, logprobs, protocol.finish_reason(delta.finish_reason))])
            if call.include_usage:
                done = [h.result(timeout=0) for h in call.handles]
                yield chunk([], protocol.usage(done[:: call.n], done))
        except Exception as error:  # noqa: BLE001 - the stream has started: tell the client in it
            message = f"generation failed: {type(error).__name__}: {error}"
            if isinstance(error, RequestCancelled):
                message = "the server shut down before the answer was complete"
            yield f"data: {json.dumps(APIError(500, message, 'server_error').body())}\n\n"
        yield "data: [DONE]\n\n"

    def logprobs(self, shape, ids: list[int], logprobs: list[float] | None, tops: list | None, offset: int) -> dict:
        """Returns a choice's logprobs in shape's form, for tokens ids."""
        pieces = [self.tokenizer.decode([t]) for t in ids]
        top_pieces = [[(self.tokenizer.decode([t]), v) for t, v in top] for top in tops or []]
        return shape.logprobs(pieces, list(logprobs or []), top_pieces, offset)

    def account(self, handles: list[RequestHandle], cancel: bool = False) -> None:
        """Records each (finished, cancelled or failed) engine request in the metrics; with ``cancel``, first cancels
        those not finished."""
        for handle in handles:
            if cancel:
                handle.cancel()
            try:
                self.metrics.finished(handle.result(timeout=0))
            except (TimeoutError, RequestCancelled):
                self.metrics.ended_early("cancelled")
            except Exception:  # noqa: BLE001 - counted, reported elsewhere
                self.metrics.ended_early("error")

    def model_card(self) -> dict:
        return {
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama_gen",
            "max_model_len": self.engine.model.args.max_seq_len,
        }  # fmt: skip

    def shutting_down(self) -> APIError:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return APIError(503, "the server is shutting down: retry on another one", "server_error", headers=headers)

    # ---- errors -------------------------------------------------------------------------------------------------
    async def api_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, APIError)
        return error_response(error)

    async def http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 404:
            message += f" (the endpoints are {', '.join(ENDPOINTS)})"
        return error_response(APIError(error.status_code, message, headers=error.headers))

    async def internal_error(self, request: Request, error: Exception) -> Response:
        message = f"internal server error ({type(error).__name__}); the server's log has the details"
        return error_response(APIError(500, message, "server_error"))


class EventStream(StreamingResponse):
    """A Server-Sent Events response that calls ``finally_`` when it ends, however it ends: streamed to the end, or
    cut by the client's leaving (even before its generator started, which then never runs its own cleanup)."""

    def __init__(self, events: AsyncIterator[str], finally_: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.finally_ = finally_

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.finally_()


class Frontdoor:
    """ASGI middleware in front of the app: the API key (401 without it), and counting every HTTP answer."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_PATHS and not self.authorized(scope):
                await error_response(self.unauthorized(scope))(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)

    def unauthorized(self, scope: Scope) -> APIError:
        given = dict(scope["headers"]).get(b"authorization")
        what = "no API key given" if given is None else "wrong API key"
        message = f"{what}: send the header 'Authorization: Bearer KEY' with the server's key (--api_key)"
        return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
