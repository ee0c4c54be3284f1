"""Interactive multi-turn chat in the terminal: streamed replies, history trimming, commands, Ctrl-C.

    python scripts/chat.py [--ckpt_dir DIR] [--temperature 0.7] [--system "Be brief."] [--max_seq_len 2048]
    torchrun --nproc_per_node 2 scripts/chat.py --ckpt_dir DIR      # model parallel: rank 0 reads and prints

The whole history is re-sent each turn. When it no longer fits in max_seq_len with room for a reply of
max_gen_len tokens, the oldest user/assistant pairs are dropped (the system prompt is kept).

Ctrl-C while a reply streams stops that reply (kept in the history as far as it got); Ctrl-C or Ctrl-D at the
prompt quits. Under torchrun, rank 0 decides: after every decoding step it broadcasts whether to stop, so all
ranks leave the reply together. Limit: a Ctrl-C typed in the terminal reaches torchrun itself, which shuts the
whole job down; only a SIGINT sent to rank 0 alone (``kill -INT <pid>``) stops just the reply. Use /exit or
Ctrl-D to leave a torchrun session cleanly.
"""

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from llama_gen.apps.cli import friendly_errors
from llama_gen.chat_format import ChatFormat, Dialog, Message, get_chat_format
from llama_gen.fast.quantize import check_quantization
from llama_gen.generation import Llama
from llama_gen.loop import StreamChunk
from llama_gen.options import LIBRARY_DEFAULTS
from llama_gen.parallel import shutdown_distributed
from llama_gen.sampling import SamplingParams

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone removes it)
  /help           show this help
  /exit           quit (Ctrl-D or Ctrl-C at the prompt also quit)
Ctrl-C while the model is answering stops the answer."""


class Channel:
    """Rank 0 talks to the user; the other ranks receive its input and stay silent."""

    def __init__(self, device: torch.device):
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.device = device
        self.tty_in = self.rank == 0 and sys.stdin.isatty()
        self.tty_out = self.rank == 0 and sys.stdout.isatty()

    def say(self, text: str = "", end: str = "\n") -> None:
        """Prints text on rank 0 (flushed at once); returns None."""
        if self.rank == 0:
            sys.stdout.write(text + end)
            sys.stdout.flush()

    def dim(self, text: str) -> None:
        """Prints one line, dimmed when stdout is a terminal; returns None."""
        self.say(f"\x1b[2m{text}\x1b[0m" if self.tty_out else text)

    def read_line(self) -> str | None:
        """Returns the user's next line on every rank, or None when the user quits (EOF, Ctrl-C)."""
        line: str | None = None
        if self.rank == 0:
            try:
                line = input("> " if self.tty_in else "")
                if not self.tty_in:
                    self.say(f"> {line}")  # a readable transcript when input is piped
            except EOFError:
                self.say()
            except KeyboardInterrupt:
                self.say()
        if self.distributed:
            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        return line

    def agree(self, flag: bool) -> bool:
        """Returns rank 0's flag on every rank (one tiny broadcast when distributed)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())


class StopOnInterrupt:
    """While active, the first SIGINT only sets ``requested`` (the reply stops after the current step);
    a second one raises KeyboardInterrupt as usual. Inactive off the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class ChatSession:
    """A conversation: system prompt, history of user/assistant pairs, and the token budget they must fit."""

    def __init__(
        self, llama: Llama, max_gen_len: int, system: str | None = None, chat_format: str | None = None, **sampling
    ) -> None:
        self.llama = llama
        self.fmt: ChatFormat = llama.get_chat_format(chat_format)
        self.max_gen_len = max_gen_len
        self.max_prompt_len = llama.model.args.max_seq_len - max_gen_len
        self.system = system
        self.sampling = sampling
        self.history: list[Message] = []  # user, assistant, user, assistant, ...
        self.trim_told = False

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
        """Returns the reply stream for text after dropping the ``drop`` oldest pairs."""
        dialog = self.dialog(self.history[2 * drop :] + [{"role": "user", "content": text}])
        return self.llama.stream_chat_completion(
            [dialog], max_gen_len=self.max_gen_len, chat_format=self.fmt.name, **self.sampling
        )

    def commit(self, text: str, reply: str, drop: int) -> None:
        """Drops the oldest pairs and records the exchange; returns None."""
        for tag in getattr(self.fmt, "special_tags", []):
            reply = reply.replace(tag, "")  # so the next turn's dialog stays valid
        self.history = self.history[2 * drop :] + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": reply},
        ]


def run_command(line: str, session: ChatSession, channel: Channel) -> bool:
    """Handles a /command; returns False when the chat should end."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.history = []
        channel.say("(conversation cleared)")
    elif name == "/system":
        session.system = arg or None
        channel.say(f"(system prompt set: {arg!r})" if arg else "(system prompt removed)")
    elif name == "/help":
        channel.say(HELP)
    else:
        channel.say(f"unknown command {name}; /help lists the commands")
    return True


def reply(session: ChatSession, channel: Channel, text: str, show_stats: bool) -> None:
    """Streams the model's answer to text, records it in the history and prints stats; returns None."""
    max_seq_len = session.llama.model.args.max_seq_len
    try:
        drop, n_prompt = session.fit(text)
    except ValueError as e:
        channel.say(f"error: {e}")
        return
    if drop < 0:
        channel.say(
            f"(that message needs {n_prompt} prompt tokens, but max_seq_len={max_seq_len} leaves "
            f"{session.max_prompt_len} after reserving max_gen_len={session.max_gen_len} for the reply: "
            "shorten it, or restart with a larger --max_seq_len or smaller --max_gen_len)"
        )
        return
    if drop and not session.trim_told:
        session.trim_told = True
        channel.say(
            f"(the conversation no longer fits in max_seq_len={max_seq_len} with room for a "
            f"{session.max_gen_len}-token reply: the oldest turns are dropped from now on, "
            "the system prompt is kept)"
        )
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    finish, stopped, shown, n = None, False, False, 0
    try:
        stream = session.stream(text, drop)  # validates eagerly: nothing is computed yet
    except ValueError as e:
        channel.say(f"error: {e}")
        return
    try:
        with StopOnInterrupt() as interrupt:
            for chunks in stream:
                for chunk in chunks:
                    parts.append(chunk.text)
                    finish = chunk.finish_reason or finish
                    n = chunk.n_tokens
                    piece = chunk.text if shown else chunk.text.lstrip()
                    if piece:
                        if first is None:
                            first = time.perf_counter()
                        channel.say(piece, end="")
                        shown = True
                if channel.agree(interrupt.requested):
                    stopped = True
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, inside a long step
        if getattr(channel, "distributed", False):
            raise  # the other ranks are mid-step: leaving this rank alone would desynchronize them
        stopped = True
    finally:
        stream.close()
    end = time.perf_counter()
    answer = "".join(parts)
    session.commit(text, answer, drop)
    channel.say()
    if stopped:
        channel.say("[stopped]")
    elif finish == "length":
        channel.say(f"[cut at max_gen_len={session.max_gen_len} tokens or max_seq_len]")
    if show_stats:
        ttft = (first or end) - start
        rate = (n - 1) / (end - first) if n > 1 and first is not None and end > first else 0.0
        channel.dim(f"[{n} tokens, {n_prompt} prompt tokens, first token {ttft:.2f} s, {rate:.1f} tok/s]")


def chat_loop(session: ChatSession, channel: Channel, show_stats: bool = True) -> None:
    """Reads lines until /exit, EOF or Ctrl-C at the prompt, answering each; returns None."""
    while True:
        line = channel.read_line()
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not run_command(line, session, channel):
                return
            continue
        reply(session, channel, line, show_stats)


def check_args(
    max_seq_len: int,
    max_batch_size: int,
    max_gen_len: int | None,
    sampling: dict,
    chat_format: str | None,
    model_parallel_size: int | None,
) -> int:
    """Raises ValueError on bad flags (before anything is loaded); returns the max_gen_len to use."""
    for name, value, low in (("max_seq_len", max_seq_len, 2), ("max_batch_size", max_batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    if max_gen_len is None:
        max_gen_len = min(512, max_seq_len // 2)
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or not 1 <= max_gen_len < max_seq_len:
        raise ValueError(f"--max_gen_len must be an integer in [1, max_seq_len={max_seq_len}), got {max_gen_len!r}")
    SamplingParams(**{k: LIBRARY_DEFAULTS[k] if v is None else v for k, v in sampling.items()})  # validates
    if chat_format is not None:
        get_chat_format(chat_format)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if model_parallel_size not in (None, world):
        raise ValueError(
            f"chat runs one copy of the model: --model_parallel_size must equal the number of "
            f"processes ({world}), got {model_parallel_size}"
        )
    return max_gen_len


@friendly_errors
def main(
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    max_seq_len: int = 2048,
    max_batch_size: int = 1,
    temperature: float | None = None,
    top_p: float | None = None,
    max_gen_len: int | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int = 1,
    chat_format: str | None = None,
    system: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_parallel_size: int | None = None,
    compile: bool = False,
    quantize: str | None = None,
    show_stats: bool = True,
    quiet_stats: bool = False,
) -> None:
    """Chats with a model in the terminal until /exit, Ctrl-D or Ctrl-C at the prompt; returns None.

    Sampling flags left out use the checkpoint's generation_config.json (then the library defaults).
    max_gen_len defaults to min(512, max_seq_len // 2). No --ckpt_dir: the default SmolLM2-135M-Instruct.
    """
    sampling = dict(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty
    )
    max_gen_len = check_args(max_seq_len, max_batch_size, max_gen_len, sampling, chat_format, model_parallel_size)
    check_quantization(quantize)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"--seed must be an integer, got {seed!r}")
    llama = Llama.build(
        ckpt_dir=None if ckpt_dir is None else str(ckpt_dir),
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        model_parallel_size=model_parallel_size,
        seed=seed,
        device=device,
        dtype=dtype,
        chat_format=chat_format,
        compile=compile,
        quantize=quantize,
    )
    channel = Channel(llama.device)
    if channel.tty_in:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if getattr(llama.forward, "compiled", False):  # a compiled llama_gen.fast.FastForward
        channel.dim("(compiling the decode step once for this run; cached on disk, so the next run is faster)")
        channel.dim(f"(compiled in {llama.forward.warm_up((1,), max_pos=0):.1f} s)")
    session = ChatSession(llama, max_gen_len, None if system is None else str(system), chat_format, **sampling)
    channel.say(
        f"(chat format {session.fmt.name}, max_seq_len={max_seq_len}, max_gen_len={max_gen_len}; "
        "/help for commands, Ctrl-D to quit)"
    )
    chat_loop(session, channel, show_stats and not quiet_stats)
    shutdown_distributed()
