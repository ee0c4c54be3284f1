"""The public API: ``Llama.build``, ``generate``, ``text_completion``, ``chat_completion`` and streaming.

Compatible with Meta's Llama 2 reference (same names, arguments and return types), plus more sampling
controls, stop strings, per-call seeds, batching beyond ``max_batch_size`` and exact streaming.
"""

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, TypedDict, Union

import torch
import torch.nn.functional as F

from llama_gen import parallel
from llama_gen.chat_format import ChatFormat, ChatMLFormat, Dialog, Message, default_chat_format, get_chat_format
from llama_gen.checkpoint import (check_shapes, kv_replication, load_state_dict, read_params,
                                  validate_parallel)
from llama_gen.cpu import has_native_bf16_matmul
from llama_gen.memory import convert_weights
from llama_gen.model import ModelArgs, Transformer
from llama_gen.quantize import check_quantization
from llama_gen.sampling import SamplingParams, sample_next_token
from llama_gen.stopping import SequenceText
from llama_gen.tokenizer import Tokenizer, load_tokenizer

PAD = -1  # fills the token matrix; never a real id, so prompts may contain the tokenizer's pad token
LIBRARY_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


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


@dataclass
class StreamChunk:
    """New text of one sequence after one decoding step; finish_reason is set on its last chunk."""

    index: int  # position of the prompt/dialog in the caller's list
    text: str
    finish_reason: Optional[str] = None
    n_tokens: int = 0  # tokens generated for this sequence so far (what the output keeps)


@dataclass
class _Result:
    tokens: list[int]
    logprobs: Optional[list[float]]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def default_device() -> torch.device:
    """Returns cuda if available, then mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Returns bf16 on GPUs that support it (fp16 on other GPUs), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """Returns a torch dtype from a name, a dtype, or None (the device's default)."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_generation_config(ckpt_dir: Path) -> dict:
    """Returns the checkpoint's ``generation_config.json`` (empty if absent)."""
    path = Path(ckpt_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


class Llama:
    @staticmethod
    def build(
        ckpt_dir: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 2048,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        chat_format: Optional[str] = None,
        compile: bool = False,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Returns a ready generator loaded from a Meta-style checkpoint directory.

        With no ckpt_dir, the default model (SmolLM2-135M-Instruct) is used, converted on first use. The
        tokenizer is found in ckpt_dir unless tokenizer_path is given. Under ``torchrun`` the model is split
        over ``model_parallel_size`` processes (default: all of them). ``quantize="int8"`` stores weights as
        int8 with per-channel scales; ``compile=True`` decodes with a compiled static-shape step (see
        llama_gen/fast.py): on CPU built ahead of time by AOTInductor in a child process and cached on disk
        (llama_gen/aot.py; ``LLAMA_GEN_AOT=0``: in-process ``torch.compile``), on GPU ``torch.compile`` with CUDA
        graphs. Either one also fuses the q/k/v and w1/w3 projections (without model parallel);
        ``compile`` on CPU also picks the fastest weight layout for the CPU (llama_gen.fast.cpu_weight_layout).
        """
        if max_seq_len < 2 or max_batch_size < 1:
            raise ValueError(f"need max_seq_len >= 2 and max_batch_size >= 1, got {max_seq_len} and {max_batch_size}")
        check_quantization(quantize)
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype, device)
        if device.type == "cpu" and dtype == torch.bfloat16 and not has_native_bf16_matmul():
            warnings.warn("this CPU has no native bf16 matmuls (it lacks AVX512): bf16 runs several times slower "
                          "than float32 beyond one row (prompts, batches); dtype='float32' is faster here",
                          stacklevel=2)
        if ckpt_dir is None:
            from llama_gen.convert import ensure_default_model

            ckpt_dir = ensure_default_model()
        ckpt_dir = Path(ckpt_dir).expanduser()
        if chat_format is not None:
            get_chat_format(chat_format)  # fail on a bad name before loading anything
        start = time.time()
        mp_size = parallel.init_distributed(model_parallel_size, device)
        torch.manual_seed(seed)  # every rank must sample the same tokens

        params = read_params(ckpt_dir)
        tokenizer = load_tokenizer(tokenizer_path or ckpt_dir)
        if params.get("vocab_size", -1) == -1:
            params["vocab_size"] = tokenizer.n_words
        if tokenizer.n_words != params["vocab_size"]:
            raise ValueError(
                f"tokenizer {tokenizer_path or ckpt_dir} has {tokenizer.n_words} tokens but "
                f"{ckpt_dir / 'params.json'} says vocab_size={params['vocab_size']}: use the tokenizer the model was trained with"
            )
        args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        validate_parallel(args, mp_size)
        state = load_state_dict(ckpt_dir, args, mp_size, parallel.model_parallel_rank())
        args.n_kv_heads = args.kv_heads * kv_replication(args.kv_heads, mp_size)
        model = build_model(args, mp_size)
        check_shapes({k: v.shape for k, v in model.state_dict().items()}, state, ckpt_dir, args)
        model.load_state_dict(convert_weights(state, dtype, device), strict=True, assign=True)
        model = model.to(device).eval()  # moves the buffers that are not in the checkpoint
        fast_forward = None
        if compile or quantize:
            from llama_gen.fast import prepare

            fast_forward = prepare(model, compile=compile, quantize=quantize)  # allocates the caches it needs
        model.ensure_caches()  # unless prepare() has, sized for the fast path: allocated once either way
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"Loaded {ckpt_dir} in {time.time() - start:.2f} s ({dtype}, {device}, mp={mp_size})", file=sys.stderr)
        llama = Llama(model, tokenizer, read_generation_config(ckpt_dir), chat_format)
        llama.fast_forward = fast_forward
        return llama

    def __init__(self, model: Transformer, tokenizer: Tokenizer, generation_config: Optional[dict] = None,
                 chat_format: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.chat_format = chat_format or self.generation_config.get("chat_format") or default_chat_format(tokenizer)
        config_eos = self.generation_config.get("eos_token_id") or []
        config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos)
        self.eos_ids = list(dict.fromkeys([*tokenizer.eos_ids, *config_eos]))
        self.fast_forward = None  # llama_gen.fast.FastForward when built with compile or quantize

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    # ---- argument handling -------------------------------------------------------------------------
    def sampling_params(self, temperature: Optional[float] = None, top_p: Optional[float] = None,
                        top_k: Optional[int] = None, min_p: Optional[float] = None,
                        repetition_penalty: Optional[float] = None) -> SamplingParams:
        """Returns validated sampling settings: explicit arguments, else the checkpoint's defaults, else ours."""
        given = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                     repetition_penalty=repetition_penalty)
        values = {}
        for name, value in given.items():
            if value is None:
                value = self.generation_config.get(name)
            values[name] = LIBRARY_DEFAULTS[name] if value is None else value
        params = SamplingParams(**values)
        params.validate()
        return params

    def _max_gen_len(self, max_gen_len: Optional[int]) -> int:
        if max_gen_len is None:
            max_gen_len = self.generation_config.get("max_new_tokens") or self.model.args.max_seq_len - 1
        if not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be a non-negative integer, got {max_gen_len!r}")
        return max_gen_len

    def _check_prompt_tokens(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
            raise ValueError("prompt_tokens must be a list of token-id lists (one per prompt)")
        max_seq_len, vocab = self.model.args.max_seq_len, self.model.args.vocab_size
        for i, tokens in enumerate(prompt_tokens):
            if len(tokens) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
            if len(tokens) > max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(tokens)} tokens but max_seq_len is {max_seq_len}: "
                    f"shorten the prompt or build with a larger max_seq_len"
                )
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")

    @staticmethod
    def _check_texts(prompts: Sequence[str], what: str = "prompts") -> None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"{what} must be a list; wrap a single prompt in a list: [{what[:-1]}]")

    @staticmethod
    def _normalize_stops(stop: Union[str, Sequence[str], None], stop_token_ids) -> tuple[list[str], list[list[int]]]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        seqs = [[s] if isinstance(s, int) else list(s) for s in (stop_token_ids or [])]
        if not all(seq and all(isinstance(t, int) for t in seq) for seq in seqs):
            raise ValueError(f"stop_token_ids must be a list of token ids or of token-id lists, got {stop_token_ids!r}")
        return stops, seqs

    # ---- the decoding loop --------------------------------------------------------------------------
    def _decode_batch(self, prompt_tokens: list[list[int]], first_index: int, max_gen_len: int,
                      params: SamplingParams, logprobs: bool, echo: bool, stop: list[str],
                      stop_token_ids: list[list[int]], eos_ids: list[int],
                      generator: Optional[torch.Generator], track_text: bool) -> Iterator[list[StreamChunk]]:
        """Decodes at most max_batch_size prompts in one padded matrix; yields each step's new text.

        Returns (as the generator's value) one _Result per prompt.
        """
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        max_seq_len = self.model.args.max_seq_len
        limits = [min(n + max_gen_len, max_seq_len) for n in prompt_lens]
        min_prompt_len, total_len = min(prompt_lens), max(limits)

        with torch.inference_mode():
            tokens = torch.full((bsz, total_len), PAD, dtype=torch.long, device=self.device)
            for i, t in enumerate(prompt_tokens):
                tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
            input_text_mask = tokens != PAD
            token_logprobs = torch.zeros(tokens.shape, dtype=torch.float, device=self.device) if logprobs else None
        seqs = [SequenceText(self.tokenizer, eos_ids, stop, stop_token_ids, track_text) for _ in range(bsz)]
        for seq, n, limit in zip(seqs, prompt_lens, limits):
            if limit <= n:
                seq.close("length")

        if min_prompt_len == total_len and logprobs:
            with torch.inference_mode():
                logits = self.model.forward(tokens, 0)
                token_logprobs[:, 1:] = -F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:],
                                                         reduction="none", ignore_index=PAD)
        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            if all(seq.finished for seq in seqs):
                break
            with torch.inference_mode():  # not held across the yield below: it would leak into the caller
                next_token = self._step(tokens, token_logprobs, input_text_mask, prev_pos, cur_pos, params, generator)
            prev_pos = cur_pos
            chunks = []
            for i, (seq, token) in enumerate(zip(seqs, next_token.tolist())):
                if seq.finished or cur_pos < prompt_lens[i]:
                    continue
                seq.push(token)
                if not seq.finished and cur_pos + 1 >= limits[i]:
                    seq.close("length")
                delta = seq.delta() if track_text else ""
                if delta or seq.finished:
                    chunks.append(StreamChunk(first_index + i, delta, seq.finish_reason, len(seq.tokens)))
            if chunks:
                yield chunks

        results = []
        for i, seq in enumerate(seqs):
            seq.close("length")
            start = 0 if echo else prompt_lens[i]
            end = prompt_lens[i] + len(seq.tokens)
            out_tokens = (list(prompt_tokens[i]) if echo else []) + seq.tokens
            out_logprobs = token_logprobs[i, start:end].tolist() if logprobs else None
            results.append(_Result(out_tokens, out_logprobs, seq.text, seq.finish_reason, prompt_lens[i],
                                   len(seq.tokens)))
        return results

    def _decode(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: Optional[int], params: SamplingParams,
                logprobs: bool = False, echo: bool = False, stop: Union[str, Sequence[str], None] = None,
                stop_token_ids=None, extra_eos: Sequence[int] = (), seed: Optional[int] = None,
                track_text: bool = True) -> Iterator[list[StreamChunk]]:
        """Validates everything (raising before any compute), then returns a generator that decodes the
        prompts in chunks of max_batch_size, yields stream chunks and returns one _Result per prompt, in order.
        """
        self._check_prompt_tokens(prompt_tokens)
        max_gen_len = self._max_gen_len(max_gen_len)
        stops, stop_seqs = self._normalize_stops(stop, stop_token_ids)
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        eos_ids = list(dict.fromkeys([*self.eos_ids, *extra_eos]))
        batch = self.model.args.max_batch_size
        groups = [[list(t) for t in prompt_tokens[first: first + batch]] for first in range(0, len(prompt_tokens), batch)]
        return self._decode_groups(groups, max_gen_len, params, logprobs, echo, stops, stop_seqs, eos_ids,
                                   generator, track_text)

    def _decode_groups(self, groups: list[list[list[int]]], *args) -> Iterator[list[StreamChunk]]:
        results: list[_Result] = []
        for group in groups:
            results += yield from self._decode_batch(group, len(results), *args)
        return results

    def _step(self, tokens: torch.Tensor, token_logprobs: Optional[torch.Tensor], input_text_mask: torch.Tensor,
              prev_pos: int, cur_pos: int, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Runs the model on tokens[prev_pos:cur_pos], fills column cur_pos (prompt tokens win) and returns it."""
        forward = self.fast_forward or self.model.forward
        # Only the logits it must: every position just for logprobs (a 512-token prompt's are ~100 MB).
        logits = forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=token_logprobs is None)
        next_token = sample_next_token(logits[:, -1], params, token_ids=tokens[:, :cur_pos], pad_id=PAD,
                                       generator=generator)
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if token_logprobs is not None:
            token_logprobs[:, prev_pos + 1: cur_pos + 1] = -F.cross_entropy(
                logits.transpose(1, 2), tokens[:, prev_pos + 1: cur_pos + 1], reduction="none", ignore_index=PAD)
        return next_token

    @staticmethod
    def _run(stream: Iterator[list[StreamChunk]]) -> list[_Result]:
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    # ---- public API ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        stop_token_ids: Optional[Sequence[Union[int, Sequence[int]]]] = None,
        seed: Optional[int] = None,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Returns (generated token ids per prompt, their logprobs or None), as Meta's reference does.

        Each output stops before the first EOS (or stop token sequence); with echo it starts with the prompt.
        """
        params = self.sampling_params(temperature, top_p, top_k, min_p, repetition_penalty)
        results = self._run(self._decode(prompt_tokens, max_gen_len, params, logprobs, echo,
                                         stop_token_ids=stop_token_ids, seed=seed, track_text=False))
        return [r.tokens for r in results], ([r.logprobs for r in results] if logprobs else None)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Returns the token ids text_completion feeds the model for prompt."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    def encode_dialog(self, dialog: Dialog, chat_format: Optional[str] = None) -> list[int]:
        """Returns the token ids chat_completion feeds the model for dialog (validated first)."""
        fmt = self.get_chat_format(chat_format)
        fmt.validate(dialog)
        return fmt.encode_dialog(self.tokenizer, dialog)

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        self._check_texts(prompts)
        return [self.encode_prompt(p) for p in prompts]

    def get_chat_format(self, name: Optional[str] = None) -> ChatFormat:
        """Returns the chat format to use: name, else the checkpoint's, with the checkpoint's default system prompt."""
        fmt = get_chat_format(name or self.chat_format)
        default_system = self.generation_config.get("default_system_prompt")
        if isinstance(fmt, ChatMLFormat) and default_system:
            fmt = ChatMLFormat(default_system)  # as the model's own chat template does (e.g. SmolLM2)
        return fmt

    def _encode_dialogs(self, dialogs: Sequence[Dialog], chat_format: Optional[str]):
        self._check_texts(dialogs, "dialogs")
        fmt = self.get_chat_format(chat_format)
        for dialog in dialogs:
            fmt.validate(dialog)
        return [fmt.encode_dialog(self.tokenizer, d) for d in dialogs], fmt.stop_ids(self.tokenizer)

    def _token_pieces(self, tokens: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in tokens]

    def text_completion(
        self,
        prompts: list[str],
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        stop: Union[str, Sequence[str], None] = None,
        stop_token_ids: Optional[Sequence[Union[int, Sequence[int]]]] = None,
        seed: Optional[int] = None,
    ) -> list[CompletionPrediction]:
        """Returns one completion per prompt: its text, finish reason, and (with logprobs) tokens and logprobs."""
        params = self.sampling_params(temperature, top_p, top_k, min_p, repetition_penalty)
        prompt_tokens = self._encode_prompts(prompts)
        results = self._run(self._decode(prompt_tokens, max_gen_len, params, logprobs, echo, stop,
                                         stop_token_ids, seed=seed))
        predictions = []
        for prompt, r in zip(prompts, results):
            pred: CompletionPrediction = {"generation": (prompt if echo else "") + r.text,
                                          "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                                          "completion_tokens": r.completion_tokens}
            if logprobs:
                pred.update(tokens=self._token_pieces(r.tokens), logprobs=r.logprobs)
            predictions.append(pred)
        return predictions

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        chat_format: Optional[str] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        stop: Union[str, Sequence[str], None] = None,
        stop_token_ids: Optional[Sequence[Union[int, Sequence[int]]]] = None,
        seed: Optional[int] = None,
    ) -> list[ChatPrediction]:
        """Returns the assistant's reply to each dialog, using the checkpoint's chat format unless overridden."""
        params = self.sampling_params(temperature, top_p, top_k, min_p, repetition_penalty)
        prompt_tokens, chat_stop_ids = self._encode_dialogs(dialogs, chat_format)
        results = self._run(self._decode(prompt_tokens, max_gen_len, params, logprobs, False, stop,
                                         stop_token_ids, extra_eos=chat_stop_ids, seed=seed))
        predictions = []
        for r in results:
            pred: ChatPrediction = {"generation": {"role": "assistant", "content": r.text},
                                    "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                                    "completion_tokens": r.completion_tokens}
            if logprobs:
                pred.update(tokens=self._token_pieces(r.tokens), logprobs=r.logprobs)
            predictions.append(pred)
        return predictions

    def stream_text_completion(
        self,
        prompts: list[str],
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_gen_len: Optional[int] = None,
        *,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        stop: Union[str, Sequence[str], None] = None,
        stop_token_ids: Optional[Sequence[Union[int, Sequence[int]]]] = None,
        seed: Optional[int] = None,
    ) -> Iterator[list[StreamChunk]]:
        """Yields, after each decoding step, the new text of each prompt that has some (and its finish reason).

        A plain generator: stop iterating and the computation stops. Concatenating a prompt's chunks gives
        exactly the text text_completion would return.
        """
        params = self.sampling_params(temperature, top_p, top_k, min_p, repetition_penalty)
        prompt_tokens = self._encode_prompts(prompts)
        return self._decode(prompt_tokens, max_gen_len, params, stop=stop, stop_token_ids=stop_token_ids, seed=seed)

    def stream_chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_gen_len: Optional[int] = None,
        *,
        chat_format: Optional[str] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        stop: Union[str, Sequence[str], None] = None,
        stop_token_ids: Optional[Sequence[Union[int, Sequence[int]]]] = None,
        seed: Optional[int] = None,
    ) -> Iterator[list[StreamChunk]]:
        """Yields, after each decoding step, the new reply text of each dialog (see stream_text_completion)."""
        params = self.sampling_params(temperature, top_p, top_k, min_p, repetition_penalty)
        prompt_tokens, chat_stop_ids = self._encode_dialogs(dialogs, chat_format)
        return self._decode(prompt_tokens, max_gen_len, params, stop=stop, stop_token_ids=stop_token_ids,
                            extra_eos=chat_stop_ids, seed=seed)


def build_model(args: ModelArgs, mp_size: int) -> Transformer:
    """Returns the model on the meta device (no weights allocated, fairscale layers included under model
    parallel); load real weights with ``load_state_dict(..., assign=True)``."""
    with torch.device("meta"), _no_random_init():
        return Transformer(args)


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Builds nn.Linear and nn.Embedding without their random init. The checkpoint replaces those weights, and
    on the meta device the init functions import torch._dynamo (74 MiB resident) for nothing."""
    saved = {cls: cls.reset_parameters for cls in (torch.nn.Linear, torch.nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset
