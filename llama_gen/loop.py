"""The generation loop, in the reference's shape: prompts padded into one ``torch.full`` token matrix, a prefill of
the shortest prompt, then one decode step per position (sample, keep prompt tokens, stop), with text tracked as
it goes so streaming and non-streaming calls run this same loop.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llama_gen.options import GenerationOptions
from llama_gen.sampling import SamplingParams, sample_next_token
from llama_gen.stopping import SequenceText

PAD = -1  # fills the token matrix; never a real id, so prompts may contain the tokenizer's pad token
# forward(tokens [b, s], start_pos, last_only) -> float32 logits [b, s or 1, vocab], filling the KV cache
Forward = Callable[..., torch.Tensor]


@dataclass
class StreamChunk:
    """New text of one sequence after one decoding step; finish_reason is set on its last chunk."""

    index: int  # position of the prompt/dialog in the caller's list
    text: str
    finish_reason: str | None = None
    n_tokens: int = 0  # tokens generated for this sequence so far (what the output keeps)


@dataclass
class Result:
    """One finished generation: its tokens (with the prompt when echoed), logprobs, text and counts."""

    tokens: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Settings:
    """What the loop needs of a request: its options, resolved against the checkpoint and the model."""

    options: GenerationOptions
    params: SamplingParams
    max_gen_len: int
    eos_ids: list[int]
    generator: torch.Generator | None
    track_text: bool


class PaddedBatch:
    """Up to max_batch_size prompts decoded together in one padded token matrix, as Meta's ``generate`` does."""

    def __init__(self, llama: Any, prompts: list[list[int]], settings: Settings, first_index: int = 0):
        """llama: what runs the model (a llama_gen.Llama: its forward, tokenizer, device and window)."""
        self.forward, self.settings, self.prompts, self.first_index = llama.forward, settings, prompts, first_index
        self.logprobs, self.echo = settings.options.logprobs, settings.options.echo
        self.prompt_lens = [len(p) for p in prompts]
        self.limits = [min(n + settings.max_gen_len, llama.model.args.max_seq_len) for n in self.prompt_lens]
        with torch.inference_mode():
            self.tokens = torch.full((len(prompts), max(self.limits)), PAD, dtype=torch.long, device=llama.device)
            for i, prompt in enumerate(prompts):
                self.tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=llama.device)
            self.is_prompt = self.tokens != PAD
            self.token_logprobs = torch.zeros(self.tokens.shape, device=llama.device) if self.logprobs else None
        opts = settings.options
        stops = (settings.eos_ids, opts.stop, opts.stop_token_ids, settings.track_text, opts.skip_special_tokens)
        self.seqs = [SequenceText(llama.tokenizer, *stops) for _ in prompts]
        for seq, n, limit in zip(self.seqs, self.prompt_lens, self.limits):
            if limit <= n:
                seq.close("length")  # no room to generate anything

    def steps(self) -> Iterator[list[StreamChunk]]:
        """Runs the loop, yielding each step's news: a prefill of the shortest prompt's length, then one decode
        step per position (longer prompts' own tokens win over samples) until every sequence has stopped."""
        start, total = min(self.prompt_lens), self.tokens.shape[1]
        if start == total:  # no room to generate: only the prompts' logprobs (the reference's echo case)
            if self.logprobs:
                self.score_prompts()
            return
        next_token = self.prefill(start)
        for cur_pos in range(start, total):
            chunks = self.record(next_token, cur_pos)
            if chunks:
                yield chunks
            if cur_pos + 1 == total or all(seq.finished for seq in self.seqs):
                return
            next_token = self.decode_step(cur_pos)

    # inference_mode is entered per call, never held across the generator's yield (it would leak into the caller)
    @torch.inference_mode()
    def prefill(self, start: int) -> list[int]:
        """Runs the model over every sequence's first ``start`` tokens; returns the tokens of column ``start``."""
        logits = self.forward(self.tokens[:, :start], 0, last_only=not self.logprobs)
        return self.sample(logits, 0, start)

    @torch.inference_mode()
    def decode_step(self, pos: int) -> list[int]:
        """Runs the model on column ``pos`` (one token per sequence); returns the tokens of column ``pos + 1``."""
        logits = self.forward(self.tokens[:, pos : pos + 1], pos, last_only=not self.logprobs)
        return self.sample(logits, pos, pos + 1)

    def sample(self, logits: torch.Tensor, prev_pos: int, cur_pos: int) -> list[int]:
        """Fills column cur_pos from the logits of positions prev_pos..cur_pos-1 (prompt tokens win over samples)
        and scores those positions' next tokens for logprobs; returns the column."""
        s = self.settings
        sampled = sample_next_token(
            logits[:, -1], s.params, token_ids=self.tokens[:, :cur_pos], pad_id=PAD, generator=s.generator
        )
        self.tokens[:, cur_pos] = torch.where(self.is_prompt[:, cur_pos], self.tokens[:, cur_pos], sampled)
        if self.logprobs:  # every position's logits were computed (last_only=False) for this
            self.token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                logits.transpose(1, 2), self.tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none", ignore_index=PAD
            )
        return self.tokens[:, cur_pos].tolist()

    def score_prompts(self) -> None:
        """Logprobs of prompts that leave no room to generate (the reference's echo-only case)."""
        with torch.inference_mode():
            logits = self.forward(self.tokens, 0)
            self.token_logprobs[:, 1:] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), self.tokens[:, 1:], reduction="none", ignore_index=PAD
            )

    def record(self, next_token: list[int], cur_pos: int) -> list[StreamChunk]:
        """Feeds each generating sequence its new token (stop checks, detokenize); returns the news."""
        chunks = []
        for i, (seq, token) in enumerate(zip(self.seqs, next_token)):
            if seq.finished or cur_pos < self.prompt_lens[i]:
                continue
            seq.push(token)
            if not seq.finished and cur_pos + 1 >= self.limits[i]:
                seq.close("length")
            delta = seq.delta() if self.settings.track_text else ""
            if delta or seq.finished:
                chunks.append(StreamChunk(self.first_index + i, delta, seq.finish_reason, len(seq.tokens)))
        return chunks

    def results(self) -> list[Result]:
        """Returns one Result per prompt (call after steps() is exhausted)."""
        results = []
        for i, seq in enumerate(self.seqs):
            seq.close("length")
            n = self.prompt_lens[i]
            start = 0 if self.echo else n
            tokens = (list(self.prompts[i]) if self.echo else []) + seq.tokens
            logprobs = self.token_logprobs[i, start : n + len(seq.tokens)].tolist() if self.logprobs else None
            results.append(Result(tokens, logprobs, seq.text, seq.finish_reason, n, len(seq.tokens)))
        return results
