"""The public API: ``Llama.build``, ``generate``, ``text_completion``, ``chat_completion`` and streaming.

Compatible with Meta's Llama 2 reference (same names, arguments and return types), plus more sampling
controls, stop strings, per-call seeds, batching beyond ``max_batch_size`` and exact streaming. Every call also
takes ``options=GenerationOptions(...)``; the reference's arguments override its fields.
"""

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch

from llama_gen import parallel
from llama_gen.chat_format import ChatFormat, ChatMLFormat, Dialog, Message, default_chat_format, get_chat_format
from llama_gen.checkpoint import load_model, read_generation_config
from llama_gen.devices import resolve_device, resolve_dtype, warn_if_slow
from llama_gen.loop import Forward, PaddedBatch, Result, Settings, StreamChunk
from llama_gen.model import Transformer
from llama_gen.options import GenerationOptions, is_int
from llama_gen.tokenizer import Tokenizer, load_tokenizer

# The reference's positional arguments of each call, in its order (Meta's llama/generation.py).
GENERATE_ARGS = ("max_gen_len", "temperature", "top_p", "logprobs", "echo")
COMPLETION_ARGS = ("temperature", "top_p", "max_gen_len", "logprobs", "echo")
CHAT_ARGS = ("temperature", "top_p", "max_gen_len", "logprobs")


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # not required
    logprobs: list[float]  # not required
    finish_reason: str  # "eos", "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # not required
    logprobs: list[float]  # not required
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str | None = None, tokenizer_path: str | None = None, max_seq_len: int = 2048,
        max_batch_size: int = 4, model_parallel_size: int | None = None, seed: int = 1,
        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
        chat_format: str | None = None, compile: bool = False, quantize: str | None = None,
    ) -> "Llama":  # fmt: skip
        """Returns a ready generator loaded from a Meta-style checkpoint directory.

        With no ckpt_dir, the default model (SmolLM2-135M-Instruct) is used, converted on first use
        (llama_gen.convert). The tokenizer is found in ckpt_dir unless tokenizer_path is given. Under ``torchrun``
        the model is split over ``model_parallel_size`` processes (default: all of them). ``compile`` and
        ``quantize="int8"`` hand the model to the fast path (llama_gen.fast, see from_model).
        """
        sizes = {"max_seq_len": (max_seq_len, 2), "max_batch_size": (max_batch_size, 1), "seed": (seed, -(2**63))}
        for name, (value, low) in sizes.items():
            if not is_int(value, low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if quantize is not None:
            from llama_gen.fast import check_quantization  # the lazy hook into the optional fast path

            check_quantization(quantize)
        if chat_format is not None:
            get_chat_format(chat_format)  # fail on a bad name before loading anything
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        warn_if_slow(device, dtype)
        if ckpt_dir is None:
            from llama_gen.convert import ensure_default_model  # the lazy hook into the conversion layer

            ckpt_dir = ensure_default_model()  # converted on first use
        ckpt_dir = Path(ckpt_dir).expanduser()
        start = time.time()
        mp_size = parallel.init_distributed(model_parallel_size, device)
        torch.manual_seed(seed)  # every rank must sample the same tokens
        tokenizer = load_tokenizer(tokenizer_path or ckpt_dir)
        model = load_model(ckpt_dir, tokenizer, device, dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        config = read_generation_config(ckpt_dir)
        llama = Llama.from_model(
            model, tokenizer, compile=compile, quantize=quantize, generation_config=config, chat_format=chat_format
        )
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"Loaded {ckpt_dir} in {time.time() - start:.2f} s ({dtype}, {device}, mp={mp_size})", file=sys.stderr
            )
        return llama

    @classmethod
    def from_model(
        cls, model: Transformer, tokenizer: Tokenizer, *, compile: bool = False, quantize: str | None = None, **kw: Any
    ) -> "Llama":
        """Returns a generator around a loaded model (``kw``: generation_config, chat_format, as for ``Llama()``).

        ``compile`` / ``quantize`` first prepare the model in place for the fast path (llama_gen.fast.prepare:
        fused projections, CPU weight layout, int8, a compiled decode step)."""
        forward = None
        if compile or quantize:
            from llama_gen.fast import prepare  # the lazy hook into the optional fast path

            forward = prepare(model, compile=compile, quantize=quantize)  # allocates the caches it needs
        model.ensure_caches()  # unless prepare() has: allocated once either way
        return cls(model, tokenizer, forward=forward, **kw)

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, generation_config: dict | None = None,
        chat_format: str | None = None, *, forward: Forward | None = None,
    ):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.forward: Forward = forward or model.forward  # tokens, start_pos, last_only -> logits
        self.generation_config = generation_config or {}
        self.chat_format = chat_format or self.generation_config.get("chat_format") or default_chat_format(tokenizer)
        config_eos = self.generation_config.get("eos_token_id") or []
        config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos)
        self.eos_ids = list(dict.fromkeys([*tokenizer.eos_ids, *config_eos]))
        self._lock, self._owner = threading.Lock(), None  # one KV cache: one generation at a time (exclusive())

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    # ---- the reference API: Meta's positional arguments, or any GenerationOptions field by keyword -------------
    def generate(
        self, prompt_tokens: list[list[int]], *args: Any, options: GenerationOptions | None = None, **more: Any
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Returns (generated token ids per prompt, their logprobs or None), as Meta's reference does.

        Positional arguments as the reference's: max_gen_len, temperature, top_p, logprobs, echo. Keywords: any
        GenerationOptions field (top_k, min_p, repetition_penalty, stop_token_ids, seed, ...). Each output stops
        before the first EOS (or stop token sequence); with echo it starts with the prompt.
        """
        opts = GenerationOptions.from_call(options, more, GENERATE_ARGS, args)
        results = self._run(prompt_tokens, self.resolve(opts, track_text=False))
        return [r.tokens for r in results], ([r.logprobs for r in results] if opts.logprobs else None)

    def text_completion(
        self, prompts: list[str], *args: Any, options: GenerationOptions | None = None, **more: Any
    ) -> list[CompletionPrediction]:
        """Returns one completion per prompt: its text, finish reason, token counts, and (with logprobs) tokens
        and logprobs. Positional arguments: temperature, top_p, max_gen_len, logprobs, echo; keywords: any
        GenerationOptions field (top_k, min_p, stop, seed, ...)."""
        opts = GenerationOptions.from_call(options, more, COMPLETION_ARGS, args)
        results = self._run(self.encode_prompts(prompts), self.resolve(opts))
        return [self._prediction((p if opts.echo else "") + r.text, r, opts) for p, r in zip(prompts, results)]

    def chat_completion(
        self, dialogs: list[Dialog], *args: Any, chat_format: str | None = None, **more: Any
    ) -> list[ChatPrediction]:
        """Returns the assistant's reply to each dialog, in the checkpoint's chat format unless chat_format names
        another. Positional arguments: temperature, top_p, max_gen_len, logprobs; keywords: ``options`` or any
        GenerationOptions field. A Llama 2 dialog with special tags gets the reference's reply (ChatFormat.reply)."""
        opts = GenerationOptions.from_call(more.pop("options", None), more, CHAT_ARGS, args)
        prompt_tokens, fmt = self.encode_dialogs(dialogs, chat_format, tags_ok=True)
        results = self._run(prompt_tokens, self.resolve(opts, fmt.stop_ids(self.tokenizer)))
        replies = [{"role": "assistant", "content": fmt.reply(d, r.text)} for d, r in zip(dialogs, results)]
        return [self._prediction(reply, r, opts) for reply, r in zip(replies, results)]

    # ---- streaming: the same loop, its news handed out after every step ---------------------------------------
    def stream_text_completion(
        self, prompts: list[str], options: GenerationOptions | None = None, **more: Any
    ) -> Iterator[list[StreamChunk]]:
        """Yields, after each decoding step, the new text of each prompt that has some (and its finish reason).

        Validates everything first (raising before any compute). A plain generator: stop iterating and the
        computation stops. Concatenating a prompt's chunks gives exactly the text text_completion returns.
        """
        opts = GenerationOptions.from_call(options, more)
        return self._stream(self.encode_prompts(prompts), self.resolve(opts))

    def stream_chat_completion(
        self, dialogs: list[Dialog], options: GenerationOptions | None = None, **more: Any
    ) -> Iterator[list[StreamChunk]]:
        """Yields, after each decoding step, the new reply text of each dialog (see stream_text_completion);
        keywords: ``chat_format`` or any GenerationOptions field."""
        prompt_tokens, fmt = self.encode_dialogs(dialogs, more.pop("chat_format", None))
        opts = GenerationOptions.from_call(options, more)
        return self._stream(prompt_tokens, self.resolve(opts, fmt.stop_ids(self.tokenizer)))

    # ---- prompts --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Returns the token ids text_completion feeds the model for prompt."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        _check_list(prompts, "prompts")
        return [self.encode_prompt(p) for p in prompts]

    def encode_dialog(self, dialog: Dialog, chat_format: str | None = None) -> list[int]:
        """Returns the token ids chat_completion feeds the model for dialog (validated first)."""
        return self.encode_dialogs([dialog], chat_format)[0][0]

    def encode_dialogs(
        self, dialogs: Sequence[Dialog], chat_format: str | None, tags_ok: bool = False
    ) -> tuple[list[list[int]], ChatFormat]:
        """Returns every dialog's token ids (all validated first) and the chat format (tags_ok: ChatFormat.reply)."""
        _check_list(dialogs, "dialogs")
        fmt = self.get_chat_format(chat_format)
        for dialog in dialogs:
            fmt.validate(dialog, tags_ok and fmt.tag_reply is not None)
        return [fmt.encode_dialog(self.tokenizer, d) for d in dialogs], fmt

    def get_chat_format(self, name: str | None = None) -> ChatFormat:
        """Returns the chat format to use: name, else the checkpoint's, with the checkpoint's default system prompt."""
        fmt = get_chat_format(name or self.chat_format)
        default_system = self.generation_config.get("default_system_prompt")
        if isinstance(fmt, ChatMLFormat) and default_system:
            fmt = ChatMLFormat(default_system)  # as the model's own chat template does (e.g. SmolLM2)
        return fmt

    # ---- running the loop -----------------------------------------------------------------------------
    def resolve(self, opts: GenerationOptions, chat_stop_ids: Sequence[int] = (), track_text: bool = True) -> Settings:
        """Returns what the loop needs of options: resolved against the checkpoint's defaults and this model's window,
        with the chat format's stop ids, and a generator of their seed (None: the process's)."""
        max_gen_len = opts.max_gen_len
        if max_gen_len is None:
            max_gen_len = self.generation_config.get("max_new_tokens") or self.model.args.max_seq_len - 1
        generator = torch.Generator(device=self.device).manual_seed(opts.seed) if opts.seed is not None else None
        eos_ids = list(dict.fromkeys([*self.eos_ids, *chat_stop_ids]))
        return Settings(opts, opts.sampling(self.generation_config), max_gen_len, eos_ids, generator, track_text)

    def _batches(self, prompt_tokens: Sequence[Sequence[int]], settings: Settings) -> Iterator[PaddedBatch]:
        """Yields the prompts in groups of max_batch_size, each made a PaddedBatch when its turn comes."""
        self.check_prompt_tokens(prompt_tokens)
        size = self.model.args.max_batch_size
        groups = [(i, [list(t) for t in prompt_tokens[i : i + size]]) for i in range(0, len(prompt_tokens), size)]
        return (PaddedBatch(self, prompts, settings, first_index=i) for i, prompts in groups)

    def _stream(self, prompt_tokens: Sequence[Sequence[int]], settings: Settings) -> Iterator[list[StreamChunk]]:
        return self._steps(self._batches(prompt_tokens, settings))  # validated now, before the caller iterates

    def _steps(self, batches: Iterator[PaddedBatch]) -> Iterator[list[StreamChunk]]:
        with self.exclusive():
            for batch in batches:
                yield from batch.steps()

    def _run(self, prompt_tokens: Sequence[Sequence[int]], settings: Settings) -> list[Result]:
        results = []
        with self.exclusive():
            for batch in self._batches(prompt_tokens, settings):
                for _ in batch.steps():
                    pass
                results += batch.results()
        return results

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[None]:
        """Holds the model's one KV cache: other threads wait their turn (so concurrent calls are serialized, never
        mixed); the thread already holding it (two unfinished streams interleaved), or any with ``wait=False`` while
        another holds it, gets a RuntimeError instead."""
        msg = "finish or close its stream first, or serve concurrent requests with llama_gen.serve.Engine"
        if self._owner == threading.get_ident():
            raise RuntimeError(f"this Llama is already generating in this thread: {msg}")
        if not self._lock.acquire(blocking=wait):
            raise RuntimeError(f"this Llama is generating in another thread (a serving engine?): {msg}")
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    def check_prompt_tokens(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        """Raises ValueError (which prompt, what is wrong, what to do) unless every prompt fits this model."""
        _check_list(prompt_tokens, "prompt_tokens")
        max_seq_len, vocab = self.model.args.max_seq_len, self.model.args.vocab_size
        for i, tokens in enumerate(prompt_tokens):
            if len(tokens) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
            if len(tokens) > max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(tokens)} tokens but max_seq_len is {max_seq_len}: "
                    "shorten the prompt or build with a larger max_seq_len"
                )
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")

    def _prediction(self, generation: str | Message, r: Result, opts: GenerationOptions) -> dict:
        pred = {"generation": generation, "finish_reason": r.finish_reason}
        pred.update(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
        if opts.logprobs:
            pred.update(tokens=[self.tokenizer.decode([t]) for t in r.tokens], logprobs=r.logprobs)
        return pred


def _check_list(items: Sequence, what: str) -> None:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ValueError(f"{what} must be a list; wrap a single prompt in a list: [{what[:-1]}]")
