"""Exact incremental detokenization for streaming, the vLLM prefix_offset/read_offset way."""

from collections.abc import Sequence
from numbers import Integral

from llama_gen.tokenizer import Tokenizer

# Prompt tokens decoded before the first generated one: enough context for sentencepiece's leading
# space and for a byte-fallback character split over several tokens.
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDecoder:
    """Turns ids pushed one or many at a time into text deltas that never need to be taken back.

    What the deltas add up to (after flush):
      * no prompt_ids: exactly tokenizer.decode(all pushed ids), the text Meta's reference returns for a
        generation (sentencepiece drops the answer's leading space). Use this for chat answers.
      * prompt_ids: exactly decode(prompt_ids + pushed)[len(decode(prompt_ids)):], the text the
        generation appends after the prompt (the leading space is kept). Use this to stream a text
        completion after printing its prompt. prompt_ids must end on a character boundary, as any
        output of encode does.
    A delta never ends inside a multi-byte character: text that decodes with a trailing U+FFFD is held
    back until later ids complete it, or until flush() if it really decodes to U+FFFD. Each push decodes
    only a small window (the ids since the previous delta plus the ids of that delta), never the whole
    sequence, so streaming costs O(window) per id, not O(length).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = [int(i) for i in prompt_ids]
        self.read_offset = len(self.ids)  # ids before this are already emitted (or are the prompt)
        self.prefix_offset = max(0, self.read_offset - PROMPT_CONTEXT_TOKENS)  # decode context starts here
        self.text = ""
        self.finished = False

    def _advance(self, final: bool) -> str:
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def push(self, ids: Sequence[int] | int) -> str:
        """Returns the new text that is now final ("" while the tail is an incomplete character)."""
        if self.finished:
            raise ValueError("push() after flush(): this stream has ended; create a new IncrementalDecoder")
        self.ids.extend([int(ids)] if isinstance(ids, Integral) else (int(i) for i in ids))
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns the text still held back (U+FFFD for ids that end in an incomplete character); ends the stream."""
        self.finished = True
        return self._advance(final=True)
