"""A request to the serving engine and the handle its submitter reads it through (from any thread, or asyncio)."""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from llama_gen.loop import Settings
from llama_gen.stopping import SequenceText
from llama_gen.tokenizer import Tokenizer


class RequestCancelled(Exception):
    """The request was cancelled (by its handle, or because the engine closed) before it finished."""


@dataclass
class Delta:
    """What one engine step added to a request: new final text, and on its last delta the finish reason."""

    text: str
    finish_reason: str | None = None
    n_tokens: int = 0  # tokens generated so far that the output keeps


@dataclass
class Timings:
    """perf_counter() times of a request's life; None where it has not got there (yet)."""

    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # took a slot
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_wait(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted


@dataclass
class Completion:
    """A finished request: its text and tokens (what the output keeps), why it stopped, counts and timings."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys and values were reused from the slot (not prefilled)
    logprobs: list[float] | None
    timings: Timings
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob) of the likeliest ones

    @property
    def decode_tokens_per_s(self) -> float | None:
        t = self.timings
        if t.first_token is None or t.finished is None or self.completion_tokens < 2 or t.finished <= t.first_token:
            return None
        return (self.completion_tokens - 1) / (t.finished - t.first_token)


class Request:
    """One generation in the engine: its prompt, settings, per-request generator, progress and listeners.

    The engine's thread is the only writer of progress; handles read it under ``self.lock``.
    """

    def __init__(
        self, prompt: list[int], settings: Settings, tokenizer: Tokenizer, max_seq_len: int, top_logprobs: int = 0
    ):
        if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be a non-negative integer, got {top_logprobs!r}")
        opts = settings.options
        self.prompt, self.settings = prompt, settings
        self.seq = SequenceText(
            tokenizer, settings.eos_ids, opts.stop, opts.stop_token_ids, skip_special_tokens=opts.skip_special_tokens
        )
        self.limit = min(len(prompt) + settings.max_gen_len, max_seq_len)  # prompt + generated tokens, at most
        self.sampled: list[int] = []  # every sampled token (the output drops stop sequences)
        self.logprobs: list[float] = []  # of each sampled token, with opts.logprobs
        self.n_top = min(top_logprobs, tokenizer.n_words) if opts.logprobs else 0
        self.top_logprobs: list[list[tuple[int, float]]] = []  # of each step, with n_top
        self.slot: int | None = None
        self.next_pos = 0  # the next cache position this request writes
        self.cached_tokens = 0
        self.timings = Timings()
        self.lock = threading.Condition()
        self.deltas: list[Delta] = []
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def prefilling(self) -> bool:
        return self.next_pos < len(self.prompt)

    @property
    def history(self) -> torch.Tensor:
        """Prompt and sampled tokens as ``[1, n]`` (what the repetition penalty looks at)."""
        return torch.tensor([self.prompt + self.sampled])

    def push(self, delta: Delta | None = None, error: BaseException | None = None, done: bool = False) -> None:
        """Hands the listeners a delta (and/or the end of the request); called by the engine's thread."""
        with self.lock:
            if delta is not None:
                self.deltas.append(delta)
            self.error = self.error or error
            self.done = self.done or done
            if self.done:
                self.timings.finished = self.timings.finished or time.perf_counter()
            self.lock.notify_all()
            wakers, self._wakers = self._wakers, []
        for loop, event in wakers:
            loop.call_soon_threadsafe(event.set)

    def completion(self) -> Completion:
        """Returns the finished request's Completion (raises its error if it failed)."""
        if self.error is not None:
            raise self.error
        opts = self.settings.options
        return Completion(
            self.seq.text, list(self.seq.tokens), self.seq.finish_reason or "length", len(self.prompt),
            len(self.seq.tokens), self.cached_tokens, self.logprobs[: len(self.seq.tokens)] if opts.logprobs else None,
            self.timings, self.top_logprobs[: len(self.seq.tokens)] if self.n_top else None,
        )  # fmt: skip


class RequestHandle:
    """What ``Engine.submit`` returns: iterate it (or ``async for`` it) for deltas, ``result()`` for the whole.

    Iterating from any thread is safe. Leaving an iteration early (break, an exception, garbage collection of the
    iterator) cancels the request, as ``cancel()`` does: its slot is freed within one engine step.
    """

    def __init__(self, request: Request, wake_engine):
        self._request = request
        self._wake_engine = wake_engine

    @property
    def timings(self) -> Timings:
        return self._request.timings

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt)

    def kept(self, start: int, end: int) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
        """Returns the output's tokens ``[start:end]`` so far (``Delta.n_tokens`` counts them) with their logprobs and
        top logprobs (empty lists where not asked for): what a stream shows alongside each delta's text."""
        r = self._request
        with r.lock:
            return r.seq.tokens[start:end], r.logprobs[start:end], r.top_logprobs[start:end]

    def cancel(self) -> None:
        """Stops the request (its iterators end with RequestCancelled unless it had already finished)."""
        if not self._request.done:
            self._request.cancelled = True
            self._wake_engine()

    def __iter__(self) -> Iterator[Delta]:
        seen, done = 0, False
        try:
            while not done:
                new, done = self._news(seen, wait=True)
                seen += len(new)
                yield from new
            self._raise_if_failed()
        finally:
            if not done:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        seen, done, loop = 0, False, asyncio.get_running_loop()
        try:
            while not done:
                event = asyncio.Event()
                new, done = self._news(seen, waker=(loop, event))
                if not new and not done:
                    await event.wait()  # set by the engine's thread when there is news
                seen += len(new)
                for delta in new:
                    yield delta
            self._raise_if_failed()
        finally:
            if not done:
                self.cancel()

    def _news(self, seen: int, wait: bool = False, waker: tuple | None = None) -> tuple[list[Delta], bool]:
        """Returns (the deltas after the first ``seen``, whether the request is done); with ``wait``, blocks until
        there is something; with ``waker`` (loop, asyncio.Event), has the event set when there is, if there isn't."""
        request = self._request
        with request.lock:
            if wait:
                request.lock.wait_for(lambda: len(request.deltas) > seen or request.done)
            new, done = request.deltas[seen:], request.done
            if waker is not None and not new and not done:
                request._wakers.append(waker)
            return new, done

    def _raise_if_failed(self) -> None:
        if self._request.error is not None:
            raise self._request.error

    def result(self, timeout: float | None = None) -> Completion:
        """Waits for the request to finish; returns its Completion (raises its error, or TimeoutError)."""
        with self._request.lock:
            if not self._request.lock.wait_for(lambda: self._request.done, timeout):
                raise TimeoutError(f"the request did not finish within {timeout} s")
        return self._request.completion()

    async def aresult(self) -> Completion:
        """``result()`` for asyncio: awaits the end of the request without blocking the event loop."""
        async for _ in self:
            pass
        return self._request.completion()
