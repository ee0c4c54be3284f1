"""Per-sequence stopping and text: EOS ids, stop token sequences and stop strings that span tokens.

Text that might still turn out to be the start of a stop string (or tokens that might start a stop token
sequence) is held back, so a streamed delta never has to be taken back.
"""

from collections.abc import Sequence

from llama_gen.detokenize import IncrementalDecoder


def _partial_stop(done: Sequence, stops: Sequence[Sequence]) -> int:
    """Returns the length of the longest suffix of ``done`` (text, or token ids) that is a proper prefix of one of
    ``stops`` (stop strings, or stop token sequences): what must be held back, as a stop may be starting."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(done)), longest, -1):
            if list(done[len(done) - n :]) == list(stop[:n]):
                longest = n
                break
    return longest


class SequenceText:
    """Tracks one generated sequence: its kept tokens, its final text, and why it stopped."""

    def __init__(
        self, tokenizer, eos_ids: Sequence[int], stop: Sequence[str] = (), stop_token_ids: Sequence[Sequence[int]] = (),
        track_text: bool = True, skip_special_tokens: bool = False,
    ):  # fmt: skip
        self.eos_ids = set(eos_ids)
        self.stop = [s for s in stop if s]
        self.stop_token_ids = [list(s) for s in stop_token_ids if len(s)]
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens) if track_text else None
        self.tokens: list[int] = []  # generated tokens that are part of the output
        self.pending: list[int] = []  # tokens that may be the start of a stop token sequence
        self.text = ""  # decoded text of self.tokens (minus anything held back by the decoder)
        self.text_ends: list[int] = []  # len(self.text) after each kept token
        self.emitted = 0  # characters of self.text already handed out as deltas
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Adds one generated token; sets finish_reason when it ends the sequence."""
        if token in self.eos_ids:
            self._accept(self.pending)
            return self._finish("eos")
        self.pending.append(token)
        for seq in self.stop_token_ids:
            if self.pending[-len(seq) :] == seq:
                self._accept(self.pending[: len(self.pending) - len(seq)])
                return self._finish("stop")
        keep = _partial_stop(self.pending, self.stop_token_ids)
        held = self.pending[len(self.pending) - keep :]
        self._accept(self.pending[: len(self.pending) - keep])
        self.pending = held
        if self.stop:
            self._cut_at_stop_string()

    def _accept(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        if self.decoder is not None:
            for token in tokens:
                self.text += self.decoder.push(token)
                self.text_ends.append(len(self.text))
        self.pending = []

    def _cut_at_stop_string(self) -> None:
        # Only the part not yet emitted (plus a stop string's length before it) can hold a new match.
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            # Tokens stop before the one in which the stop string begins.
            kept = sum(1 for end in self.text_ends if end <= cut)
            del self.tokens[kept:], self.text_ends[kept:]
            self._finish("stop")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if reason != "stop" and self.decoder is not None:
            self.text += self.decoder.flush()

    def close(self, reason: str = "length") -> None:
        """Ends the sequence (if still running) for reason, releasing any held-back tokens."""
        if not self.finished:
            self._accept(self.pending)
            if self.stop:
                self._cut_at_stop_string()
            if not self.finished:
                self._finish(reason)

    def delta(self) -> str:
        """Returns the text that became final since the last call."""
        end = len(self.text) if self.finished else len(self.text) - _partial_stop(self.text, self.stop)
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted : end], end
        return out
