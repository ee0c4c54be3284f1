"""A conversation as a library object: history in, reply (streamed or whole) and new history out.

The history is trimmed to the window the way the chat program does it (the oldest user/assistant pairs go first,
the system prompt stays). On a serving engine each turn reuses the cache rows of the turns before it, so only the
new turn is prefilled; on a plain Llama (e.g. model parallel under torchrun) the whole dialog is run each turn.
"""

from collections.abc import Iterator

from llama_gen.chat_format import ChatFormat, Dialog, Message
from llama_gen.generation import Llama
from llama_gen.loop import StreamChunk
from llama_gen.options import GenerationOptions
from llama_gen.serve.engine import Engine
from llama_gen.serve.request import RequestHandle


class ChatSession:
    """A conversation: system prompt, history of user/assistant pairs, and the token budget they must fit (max_seq_len
    less max_gen_len, and at most the checkpoint's generation_config max_window_size).

    ``engine``: serve the turns on it (prefix reuse); without one they run on ``llama`` directly. ``sampling``: any
    GenerationOptions field but max_gen_len (the reply's budget, reserved in the window).
    """

    def __init__(
        self, llama: Llama, max_gen_len: int, system: str | None = None, chat_format: str | None = None,
        engine: Engine | None = None, history: list[Message] | None = None, **sampling: object,
    ) -> None:  # fmt: skip
        self.llama, self.engine = llama, engine
        self.fmt: ChatFormat = llama.get_chat_format(chat_format)
        self.options = GenerationOptions(max_gen_len=max_gen_len, **sampling)
        self.max_gen_len = max_gen_len
        self.max_prompt_len = llama.model.args.max_seq_len - max_gen_len
        window = llama.generation_config.get("max_window_size")  # Qwen's bound on a chat's prompt window
        if window:
            self.max_prompt_len = min(self.max_prompt_len, window)
        self.system = system
        self.history: list[Message] = list(history or [])  # user, assistant, user, assistant, ...
        self.handle: RequestHandle | None = None  # the engine's handle of the latest turn (its Completion, timings)
        if history:
            self.fmt.validate(self.dialog(self.history + [{"role": "user", "content": "?"}]))

    def dialog(self, turns: list[Message]) -> Dialog:
        """Returns turns with the system prompt (if any) in front."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_len(self, turns: list[Message]) -> int:
        """Returns the number of prompt tokens the chat format makes of the system prompt plus turns."""
        return len(self.fmt.encode_dialog(self.llama.tokenizer, self.dialog(turns)))

    def fit(self, text: str) -> tuple[int, int]:
        """Returns (user/assistant pairs to drop so the history plus text fits, prompt tokens after dropping).

        When even text alone (with the system prompt) is too long, the pair count is -1.
        """
        user: Message = {"role": "user", "content": text}
        self.fmt.validate(self.dialog([user]))  # reserved tags etc.: a ValueError for the caller to show
        for drop in range(len(self.history) // 2 + 1):
            n = self.prompt_len(self.history[2 * drop :] + [user])
            if n <= self.max_prompt_len:
                return drop, n
        return -1, n

    def stream(self, text: str, drop: int) -> Iterator[list[StreamChunk]]:
        """Returns the reply stream for text after dropping the ``drop`` oldest pairs (as Llama's streams yield)."""
        dialog = self.dialog(self.history[2 * drop :] + [{"role": "user", "content": text}])
        if self.engine is None:
            return self.llama.stream_chat_completion([dialog], options=self.options, chat_format=self.fmt.name)
        self.handle = self.engine.submit_chat(dialog, self.options, chat_format=self.fmt.name)
        return ([StreamChunk(0, d.text, d.finish_reason, d.n_tokens)] for d in self.handle)

    def commit(self, text: str, reply: str, drop: int) -> None:
        """Drops the oldest pairs and records the exchange; returns None."""
        for tag in getattr(self.fmt, "special_tags", []):
            reply = reply.replace(tag, "")  # so the next turn's dialog stays valid
        self.history = self.history[2 * drop :] + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": reply},
        ]

    def send(self, text: str) -> Iterator[str]:
        """Returns an iterator of the reply to text, piece by piece as it comes; the exchange joins the history when
        the reply ends (as far as it got if the iteration stops early or fails). Raises ValueError now, before any
        work, when text is invalid or cannot fit the window even alone."""
        drop, n_prompt = self.fit(text)
        if drop < 0:
            raise ValueError(
                f"that message needs {n_prompt} prompt tokens, but the prompt window is {self.max_prompt_len} "
                f"(max_seq_len less max_gen_len={self.max_gen_len}, at most the checkpoint's max_window_size): "
                "shorten it or reserve less"
            )
        return self._relay(text, drop, self.stream(text, drop))

    def _relay(self, text: str, drop: int, stream: Iterator[list[StreamChunk]]) -> Iterator[str]:
        parts: list[str] = []
        try:
            for chunks in stream:
                for chunk in chunks:
                    parts.append(chunk.text)
                    yield chunk.text
        finally:
            stream.close()
            self.commit(text, "".join(parts), drop)

    def reply(self, text: str) -> str:
        """Returns the whole reply to text (and records the exchange)."""
        return "".join(self.send(text))
