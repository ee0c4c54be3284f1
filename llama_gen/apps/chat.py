"""Interactive multi-turn chat in the terminal: streamed replies, history trimming, commands, Ctrl-C.

    python scripts/chat.py [--ckpt_dir DIR] [--temperature 0.7] [--system "Be brief."] [--max_seq_len 2048]
    torchrun --nproc_per_node 2 scripts/chat.py --ckpt_dir DIR      # model parallel: rank 0 reads and prints

Turns run on a serving engine (llama_gen.serve): each reuses the cache of the conversation so far, so only the
new turn is prefilled (under torchrun, rank 0 runs the engine and the other ranks make the same model calls).
By default the first replies come at once from the eager decode step while the compiled one builds in the
background (cached on disk: later runs load it in a moment); --compile compiles first, --nocompile never.
When the history no longer fits in
max_seq_len with room for a reply of max_gen_len tokens, the oldest user/assistant pairs are dropped (the system
prompt is kept). A reply that fails (say, out of memory) is kept as far as it got, with the error, and the chat
goes on.

Ctrl-C while a reply streams stops that reply (kept in the history as far as it got); Ctrl-C or Ctrl-D at the
prompt quits. Under torchrun, a Ctrl-C typed in the terminal reaches torchrun itself, which shuts the whole job
down; only a SIGINT sent to rank 0 alone (``kill -INT <pid>``) stops just the reply. Use /exit or Ctrl-D to leave
a torchrun session cleanly.
"""

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from llama_gen.apps.errors import friendly_errors
from llama_gen.apps.flags import (
    COMPILE_AUTO,
    MODEL_FLAGS,
    SAMPLING_FLAGS,
    Flag,
    check_model_flags,
    check_sampling_flags,
    compile_in_background,
    model_flags,
    select,
    takes,
)
from llama_gen.generation import Llama
from llama_gen.loop import StreamChunk
from llama_gen.parallel import shutdown_distributed
from llama_gen.serve import Engine
from llama_gen.serve.chat import ChatSession
from llama_gen.serve.ranks import follow, schedules
from llama_gen.serve.threads import on_passing_thread

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone removes it)
  /help           show this help
  /exit           quit (Ctrl-D or Ctrl-C at the prompt also quit)
Ctrl-C while the model is answering stops the answer."""


class Channel:
    """The terminal: the user's lines in, the replies out (on rank 0, the one that runs the engine)."""

    def __init__(self) -> None:
        self.tty_in, self.tty_out = sys.stdin.isatty(), sys.stdout.isatty()

    def say(self, text: str = "", end: str = "\n") -> None:
        """Prints text (flushed at once); returns None."""
        sys.stdout.write(text + end)
        sys.stdout.flush()

    def dim(self, text: str) -> None:
        """Prints one line, dimmed when stdout is a terminal; returns None."""
        self.say(f"\x1b[2m{text}\x1b[0m" if self.tty_out else text)

    def read_line(self) -> str | None:
        """Returns the user's next line, or None when the user quits (EOF, Ctrl-C)."""
        try:
            line = input("> " if self.tty_in else "")
        except (EOFError, KeyboardInterrupt):
            self.say()
            return None
        if not self.tty_in:
            self.say(f"> {line}")  # a readable transcript when input is piped
        return line

    def stops(self, requested: bool) -> bool:
        """Whether the reply streaming now stops after this step (requested: Ctrl-C was pressed)."""
        return requested


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


class TerminalChat(ChatSession):
    """The library's ChatSession, plus what the terminal says only once (that old turns are being dropped)."""

    trim_told = False


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


@dataclass
class Streamed:
    """What one streamed reply came to."""

    text: str = ""
    finish_reason: str | None = None
    n_tokens: int = 0
    stopped: bool = False  # by Ctrl-C
    error: Exception | None = None  # what ended the reply early (the engine went on)
    first_at: float | None = None  # perf_counter() when the first visible text arrived


def fit_or_explain(session: ChatSession, channel: Channel, text: str) -> tuple[int, int] | None:
    """Returns (pairs to drop, prompt tokens) for text, or None after telling the user why it cannot be sent."""
    max_seq_len = session.llama.model.args.max_seq_len
    try:
        drop, n_prompt = session.fit(text)
    except ValueError as e:
        channel.say(f"error: {e}")
        return None
    if drop < 0:
        channel.say(
            f"(that message needs {n_prompt} prompt tokens, but the prompt window is {session.max_prompt_len} "
            f"(max_seq_len={max_seq_len} less max_gen_len={session.max_gen_len} for the reply, at most the "
            "checkpoint's max_window_size): shorten it, or restart with a larger --max_seq_len or smaller "
            "--max_gen_len)"
        )
        return None
    if drop and not session.trim_told:
        session.trim_told = True
        channel.say(
            f"(the conversation no longer fits in its {session.max_prompt_len}-token prompt window (max_seq_len="
            f"{max_seq_len} with room for a {session.max_gen_len}-token reply): the oldest turns are dropped from "
            "now on, the system prompt is kept)"
        )
    return drop, n_prompt


def show_stream(stream: Iterator[list[StreamChunk]], channel: Channel) -> Streamed:
    """Prints the reply as it streams until it ends or the user stops it (Ctrl-C); returns what it came to."""
    out = Streamed()
    parts: list[str] = []
    try:
        with StopOnInterrupt() as interrupt:
            for chunks in stream:
                for chunk in chunks:
                    parts.append(chunk.text)
                    out.finish_reason = chunk.finish_reason or out.finish_reason
                    out.n_tokens = chunk.n_tokens
                    piece = chunk.text if out.first_at is not None else chunk.text.lstrip()
                    if piece:
                        out.first_at = out.first_at or time.perf_counter()
                        channel.say(piece, end="")
                if channel.stops(interrupt.requested):
                    out.stopped = True
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, inside a long step
        out.stopped = True
    except Exception as error:  # noqa: BLE001 - a failed step (out of memory, ...): keep what came, go on
        out.error = error
    finally:
        stream.close()
    out.text = "".join(parts)
    return out


def reply(session: ChatSession, channel: Channel, text: str, show_stats: bool) -> None:
    """Streams the model's answer to text, records it in the history and prints stats; returns None."""
    fit = fit_or_explain(session, channel, text)
    if fit is None:
        return
    drop, n_prompt = fit
    start = time.perf_counter()
    try:
        stream = session.stream(text, drop)  # validates eagerly: nothing is computed yet
    except ValueError as e:
        channel.say(f"error: {e}")
        return
    out = show_stream(stream, channel)
    end = time.perf_counter()
    session.commit(text, out.text, drop)
    channel.say()
    if out.error is not None:
        channel.say(f"[error: {type(out.error).__name__}: {out.error}; the reply is kept as far as it got]")
    elif out.stopped:
        channel.say("[stopped]")
    elif out.finish_reason == "length":
        channel.say(f"[cut at max_gen_len={session.max_gen_len} tokens or max_seq_len]")
    if show_stats:
        n, first = out.n_tokens, out.first_at
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


CHAT_FLAGS = (
    Flag("system", None, str | None, "the system prompt (/system changes it during the chat)"),
    Flag("show_stats", True, bool, "print token counts, time to first token and speed after each reply"),
    Flag("quiet_stats", False, bool, "hide those stats (as --show_stats False does)"),
)


def check_flags(values: dict) -> dict:
    """Raises ValueError on bad flags (before anything is loaded); returns the generation settings given, with
    the max_gen_len to use."""
    check_model_flags(values)
    max_seq_len, max_gen_len = values["max_seq_len"], values["max_gen_len"]
    if max_gen_len is None:
        max_gen_len = min(512, max_seq_len // 2)
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or not 1 <= max_gen_len < max_seq_len:
        raise ValueError(f"--max_gen_len must be an integer in [1, max_seq_len={max_seq_len}), got {max_gen_len!r}")
    settings = check_sampling_flags(values)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if values["model_parallel_size"] not in (None, world):
        raise ValueError(
            f"chat runs one copy of the model: --model_parallel_size must equal the number of "
            f"processes ({world}), got {values['model_parallel_size']}"
        )
    return {**settings, "max_gen_len": max_gen_len}


def warm_up(llama: Llama, channel: Channel) -> None:
    """Compiles the decode step now when the model was built with --compile (so the first reply is not slow),
    saying so; returns None."""
    if getattr(llama.forward, "compiled", False):  # a compiled llama_gen.fast.FastForward
        channel.dim("(compiling the decode step once for this run; cached on disk, so the next run is faster)")
        channel.dim(f"(compiled in {llama.forward.warm_up((1,), max_pos=0):.1f} s)")


@friendly_errors
@takes(select(MODEL_FLAGS, max_batch_size=1, compile=COMPILE_AUTO), SAMPLING_FLAGS, CHAT_FLAGS)
def main(values: dict) -> None:
    """Chats with a model in the terminal until /exit, Ctrl-D or Ctrl-C at the prompt; returns None.

    Sampling flags left out use the checkpoint's generation_config.json (then the library defaults).
    max_gen_len defaults to min(512, max_seq_len // 2). No --ckpt_dir: the default SmolLM2-135M-Instruct.
    """
    settings = check_flags(values)
    llama = on_passing_thread(Llama.build, **model_flags(values))  # (why: llama_gen.serve.threads)
    if not schedules():  # model parallel: rank 0 runs the engine and talks to the user; the others follow it
        follow(llama)
        shutdown_distributed()
        return
    channel = Channel()
    if channel.tty_in:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    on_passing_thread(warm_up, llama, channel)
    system = None if values["system"] is None else str(values["system"])
    # The turns run on a serving engine, so each reuses the cache of the turns before it (only the new turn is
    # prefilled).
    engine = Engine(llama, compile_in_background=compile_in_background(values))
    session = TerminalChat(llama, system=system, chat_format=values["chat_format"], engine=engine, **settings)
    channel.say(
        f"(chat format {session.fmt.name}, max_seq_len={values['max_seq_len']}, max_gen_len={session.max_gen_len}; "
        "/help for commands, Ctrl-D to quit)"
    )
    chat_loop(session, channel, values["show_stats"] and not values["quiet_stats"])
    engine.close()
    shutdown_distributed()
