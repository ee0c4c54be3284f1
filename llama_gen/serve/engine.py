"""The serving engine: continuous batching over the KV cache's rows, prefix reuse, safe from any thread.

One thread drives the model. Each turn of its loop:

1. drops cancelled requests, and admits waiting ones into free rows (slots), each into the row that already holds
   the longest prefix of its prompt (the previous chat turn, a shared system prompt): only the rest is prefilled;
2. prefills one chunk (at most ``prefill_chunk`` tokens) of the oldest admitted request's prompt, so running
   streams keep flowing while a long prompt goes in;
3. runs one decode step for every row at once, each at its own position (one static shape for any number of
   active requests: the compiled step of llama_gen.fast serves them all), then samples each request's token with
   its own settings and generator, checks its stops, and hands its listeners the new text.

A finished or cancelled request frees its row at once. A bad request fails alone when submitted, before it takes a
row; an exception in a step fails that step's requests with the error and the engine goes on.
"""

import collections
import contextlib
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from llama_gen.chat_format import Dialog
from llama_gen.fast.background import BackgroundCompile, can_compile_in_background
from llama_gen.fast.step import attention_window
from llama_gen.generation import Llama
from llama_gen.options import GenerationOptions
from llama_gen.sampling import sample_next_token
from llama_gen.serve.ranks import HEARTBEAT_S, ModelCalls
from llama_gen.serve.request import Delta, Request, RequestCancelled, RequestHandle
from llama_gen.serve.slots import SlotTable


class QueueFull(Exception):
    """The engine's queue is full: retry later."""


class EngineClosed(RuntimeError):
    """The engine was closed; it takes no more requests."""


class Engine:
    """Serves many requests at once on one Llama: ``submit`` from any thread, read each through its handle.

    The Llama's cache rows (``max_batch_size``) are the slots; a compiled Llama (``compile=True``) decodes with
    its compiled step, otherwise the same step runs eagerly; with ``compile_in_background`` (a Llama built with
    neither compile nor quantize, on CPU, one rank) it runs eagerly while the compiled step builds, then switches
    to it between two steps. While the engine runs it owns the model: the Llama's own calls (from other threads)
    wait until ``close()``. Under model parallel it runs on the first rank of each model-parallel group and the
    group's other ranks run ``llama_gen.serve.ranks.follow``. Load the Llama on a passing thread
    (``llama_gen.serve.threads.on_passing_thread``): the engine's steps are then the only OpenMP work.
    """

    def __init__(
        self, llama: Llama, max_queue: int = 1024, prefill_chunk: int = 256, compile_in_background: bool = False
    ):
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.llama, self.model = llama, llama.model
        self.calls = ModelCalls(llama)
        background = compile_in_background and llama.forward == llama.model.forward
        self.compiling = BackgroundCompile(self.model) if background and can_compile_in_background(self.model) else None
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.slots = SlotTable(self.model.args.max_batch_size)
        self.waiting: collections.deque[Request] = collections.deque()
        self.admitted: list[Request] = []  # in admission order
        self.wake = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="llama_gen-engine", daemon=True)
        self.started, self.start_error = threading.Event(), None
        self.thread.start()
        self.started.wait()
        if self.start_error is not None:
            raise self.start_error

    # ---- submitting -------------------------------------------------------------------------------------------
    def submit(
        self, prompt_tokens: Sequence[int], options: GenerationOptions | None = None, stop_ids: Sequence[int] = (),
        top_logprobs: int = 0, **more: Any,
    ) -> RequestHandle:  # fmt: skip
        """Queues one generation of prompt_tokens; returns its handle. ``stop_ids``: more ids that end it (a chat
        format's); ``top_logprobs``: with logprobs, also record each step's likeliest tokens (that many); ``more``:
        any GenerationOptions field. Bad input raises ValueError here, before anything runs; a full queue raises
        QueueFull, a closed engine EngineClosed."""
        self.llama.check_prompt_tokens([prompt_tokens])
        settings = self.llama.resolve(GenerationOptions.from_call(options, more), stop_ids)
        if settings.generator is None:  # each request draws from its own generator: traffic never shifts its draws
            seed = int(torch.randint(0, 2**62, (1,)))
            settings.generator = torch.Generator(device=self.llama.device).manual_seed(seed)
        request = Request(
            list(prompt_tokens), settings, self.llama.tokenizer, self.model.args.max_seq_len, top_logprobs
        )
        if request.limit <= len(request.prompt):  # no room to generate (max_gen_len 0, or a prompt filling the window)
            request.seq.close("length")
            request.push(Delta("", "length", 0), done=True)
            return RequestHandle(request, self._notify)
        with self.wake:
            if self.closed:
                raise EngineClosed("the engine is closed")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}): retry later")
            self.waiting.append(request)
            self.wake.notify()
        return RequestHandle(request, self._notify)

    def submit_text(self, prompt: str, options: GenerationOptions | None = None, **more: Any) -> RequestHandle:
        """Queues a text completion of prompt (as ``Llama.text_completion`` encodes it)."""
        return self.submit(self.llama.encode_prompt(prompt), options, **more)

    def submit_chat(
        self, dialog: Dialog, options: GenerationOptions | None = None, chat_format: str | None = None, **more: Any
    ) -> RequestHandle:
        """Queues the assistant's reply to dialog (as ``Llama.chat_completion`` encodes it)."""
        fmt = self.llama.get_chat_format(chat_format)
        fmt.validate(dialog)
        prompt = fmt.encode_dialog(self.llama.tokenizer, dialog)
        return self.submit(prompt, options, stop_ids=fmt.stop_ids(self.llama.tokenizer), **more)

    def close(self, timeout: float | None = None) -> None:
        """Stops the engine: requests still waiting or running end with RequestCancelled."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _notify(self) -> None:
        with self.wake:
            self.wake.notify()

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with contextlib.ExitStack() as stack:
            try:  # the engine owns the model until it closes: the Llama's own calls wait until then
                stack.enter_context(self.llama.exclusive(wait=False))
            except RuntimeError as error:  # another engine, or a generation, holds it
                self.start_error = error
            self.started.set()
            if self.start_error is None:
                self._loop()

    def _loop(self) -> None:
        while True:
            with self.wake:
                busy = self.wake.wait_for(lambda: self.closed or self.waiting or self.admitted, self._idle_wait())
                if self.closed:
                    break
            self._switch_if_compiled()
            if not busy:
                self.calls.idle()
                continue
            self._drop_cancelled()
            self._admit()
            self._prefill_one_chunk()
            self._decode_all()
            self.steps += 1
        for request in [*self.admitted, *self.waiting]:
            self._end(request, error=RequestCancelled("the engine was closed"))
        if self.compiling is not None:
            self.compiling.cancel()
        self.calls.stop()

    def _idle_wait(self) -> float | None:
        """How long the loop may sleep with nothing to do: briefly while a compiled step builds (to switch to it
        once ready), a heartbeat under model parallel, else until woken."""
        if self.compiling is not None:
            return 0.5
        return HEARTBEAT_S if self.calls.broadcasting else None

    def _switch_if_compiled(self) -> None:
        """Between two steps: moves to the compiled step once its background build is done (on failure, says
        why and stays eager)."""
        if self.compiling is None or not self.compiling.ready():
            return
        compiling, self.compiling = self.compiling, None
        try:
            self.llama.forward = self.calls.step = compiling.switch()
        except Exception as error:  # noqa: BLE001 - nothing lost: the eager step goes on
            warnings.warn(f"the compiled decode step is not available ({error}); decoding eagerly", stacklevel=1)

    def _drop_cancelled(self) -> None:
        with self.wake:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                request.push(error=RequestCancelled("cancelled"), done=True)
        for request in [r for r in self.admitted if r.cancelled]:
            self._end(request, error=RequestCancelled("cancelled"))

    def _admit(self) -> None:
        while self.slots.free():
            with self.wake:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            slot, reused = self.slots.take(request.prompt, request)
            request.slot, request.next_pos, request.cached_tokens = slot.index, reused, reused
            request.timings.admitted = time.perf_counter()
            self.admitted.append(request)

    def _prefill_one_chunk(self) -> None:
        request = next((r for r in self.admitted if r.prefilling), None)
        if request is None:
            return
        start, end = request.next_pos, min(request.next_pos + self.prefill_chunk, len(request.prompt))
        try:
            tokens = torch.tensor([request.prompt[start:end]], device=self.llama.device)
            with torch.inference_mode():
                logits = self.calls.prefill(tokens, start, request.slot)
            request.next_pos = end
            if not request.prefilling:
                self._sample(request, logits[0, -1])
        except Exception as error:  # noqa: BLE001 - this request fails alone; the engine goes on
            self._end(request, error=error, keep_cache=False)

    def _decode_all(self) -> None:
        decoding = [r for r in self.admitted if not r.prefilling and not r.done]
        if not decoding:
            return
        tokens, positions = self._rows(decoding)
        window = attention_window(max(r.next_pos for r in decoding), self.model.args.max_seq_len)
        try:
            with torch.inference_mode():
                logits = self.calls.decode(tokens, positions, window)
            for request in decoding:
                request.next_pos += 1
                self._sample(request, logits[request.slot, -1])
        except Exception as error:  # noqa: BLE001 - the step's requests fail; the engine goes on
            for request in decoding:
                self._end(request, error=error, keep_cache=False)

    def _rows(self, decoding: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's input for one decode step: a request's last token at its position; a free row writes a
        dummy token just past what it holds (out of every active row's window), so its prefix stays reusable."""
        max_seq_len = self.model.args.max_seq_len
        tokens, positions = [0] * len(self.slots.slots), [0] * len(self.slots.slots)
        for slot in self.slots.slots:
            if slot.request is None:
                del slot.held[max_seq_len - 1 :]  # a full row gives up its last position
                positions[slot.index] = len(slot.held)
        for request in self.admitted:
            if request in decoding:
                tokens[request.slot], positions[request.slot] = request.sampled[-1], request.next_pos
            else:  # still prefilling: write past its prompt so far (overwritten by its next chunk)
                positions[request.slot] = min(request.next_pos, max_seq_len - 1)
        device = self.llama.device
        return torch.tensor(tokens, device=device)[:, None], torch.tensor(positions, device=device)

    # ---- one request's token -------------------------------------------------------------------------------------
    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        """Samples the request's next token from its last logits ``[vocab]``, checks its stops, pushes its news."""
        s = request.settings
        history = request.history if s.params.repetition_penalty != 1 else None
        token = int(sample_next_token(logits[None], s.params, token_ids=history, generator=s.generator))
        if s.options.logprobs:
            logprobs = F.log_softmax(logits.float(), dim=-1)
            request.logprobs.append(float(logprobs[token]))
            if request.n_top:
                top = logprobs.topk(request.n_top)
                request.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist())))
        request.sampled.append(token)
        request.timings.first_token = request.timings.first_token or time.perf_counter()
        request.seq.push(token)
        if not request.seq.finished and len(request.prompt) + len(request.sampled) >= request.limit:
            request.seq.close("length")
        delta = request.seq.delta()
        finished = request.seq.finished
        if delta or finished:
            request.push(Delta(delta, request.seq.finish_reason, len(request.seq.tokens)))
        if finished:
            self._end(request)

    def _end(self, request: Request, error: BaseException | None = None, keep_cache: bool = True) -> None:
        """Ends a request (finished, failed or cancelled) and frees its row at once."""
        if request in self.admitted:
            self.admitted.remove(request)
            slot = self.slots.slots[request.slot]
            # In the cache: the prompt so far and every sampled token but the last (written by the next step).
            held = (request.prompt + request.sampled)[: request.next_pos] if keep_cache else []
            self.slots.release(slot, held)
        request.push(error=error, done=True)
