"""The interactive chat: history trimming, commands, interruption, a real terminal, and torchrun."""

import os
import re
import signal
import sys
import time

import pytest
from conftest import LLAMA2_TOKENIZER, REPO
from programs import ENV, run_script, torchrun

from llama_gen.apps import chat as chat_app
from llama_gen.apps.chat import StopOnInterrupt, TerminalChat, chat_loop


def default_sigint() -> None:
    """Run in the spawned chat before exec: Ctrl-C works even if this test run inherited SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


STATS = re.compile(r"\[(\d+) tokens, (\d+) prompt tokens, first token [\d.]+ s, [\d.]+ tok/s\]")


class FakeChannel:
    """Stands in for chat_app.Channel: scripted input lines, recorded output, optional stop after n steps."""

    def __init__(self, lines, stop_after=None):
        self.lines, self.out, self.steps, self.stop_after = list(lines), [], 0, stop_after

    def say(self, text="", end="\n"):
        self.out.append(text + end)

    def dim(self, text):
        self.say(text)

    def read_line(self):
        return self.lines.pop(0) if self.lines else None

    def stops(self, flag):
        self.steps += 1
        return flag or (self.stop_after is not None and self.steps >= self.stop_after)

    @property
    def text(self):
        return "".join(self.out)


def session(llama, max_gen_len=16, **kw):
    return TerminalChat(llama, max_gen_len, temperature=0, **kw)


def test_history_is_resent_and_reset_forgets(tiny_llama):
    _, llama = tiny_llama
    s = session(llama, system="Be brief.")
    ch = FakeChannel(["hello there"])
    chat_loop(s, ch)
    first = list(s.history)
    ch = FakeChannel(["and again", "/reset", "hello there"])
    chat_loop(s, ch)
    stats = [int(p) for _, p in STATS.findall(ch.text)]
    assert len(stats) == 2 and stats[0] > stats[1]  # turn 2 carried turn 1; after /reset it is gone
    assert s.history == first  # greedy: the same fresh dialog gets the same reply
    assert s.system == "Be brief." and first[1]["content"]


def test_commands(tiny_llama):
    _, llama = tiny_llama
    s = session(llama)
    ch = FakeChannel(["/system You are terse.", "/help", "/bogus", "/system", "/exit", "never read"])
    chat_loop(s, ch)
    assert "system prompt set" in ch.text and "/reset" in ch.text and "unknown command /bogus" in ch.text
    assert "system prompt removed" in ch.text and s.system is None
    assert ch.lines == ["never read"]


def test_long_conversation_drops_oldest_turns_and_never_raises(tiny_llama):
    _, llama = tiny_llama  # max_seq_len=128
    s = session(llama, max_gen_len=24, system="Keep answers short.")
    msgs = [f"message number {i}: tell me something about the number {i} please" for i in range(10)]
    too_long = "word " * 150
    ch = FakeChannel(msgs[:5] + [too_long] + msgs[5:])
    chat_loop(s, ch)
    assert ch.text.count("the oldest turns are dropped") == 1  # told once
    assert "that message needs" in ch.text  # the single too-long message is refused, not fatal
    stats = STATS.findall(ch.text)
    assert len(stats) == 10
    assert all(int(p) <= 128 - 24 for _, p in stats)
    assert s.history[0]["role"] == "user" and len(s.history) < 20 and s.history[-2]["content"] == msgs[-1]
    assert s.prompt_len(s.history[:-1]) <= 128


def test_fit_drops_the_fewest_whole_pairs(tiny_llama):
    _, llama = tiny_llama
    s = session(llama, max_gen_len=32, system="sys")
    s.history = sum(
        (
            [{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": f"answer {i} " * 4}]
            for i in range(6)
        ),
        [],
    )
    drop, n = s.fit("next question")
    user = {"role": "user", "content": "next question"}
    assert drop > 0 and n == s.prompt_len(s.history[2 * drop :] + [user]) <= s.max_prompt_len
    assert s.prompt_len(s.history[2 * (drop - 1) :] + [user]) > s.max_prompt_len
    assert s.fit("x " * 200)[0] == -1


def test_interrupted_reply_is_kept_and_chat_goes_on(tiny_llama):
    _, llama = tiny_llama
    s = session(llama, max_gen_len=20)
    ch = FakeChannel(["tell me a story"], stop_after=3)
    chat_loop(s, ch)
    assert "[stopped]" in ch.text
    partial = s.history[1]["content"]
    full = llama.chat_completion([[{"role": "user", "content": "tell me a story"}]], temperature=0, max_gen_len=20)[0][
        "generation"
    ]["content"]
    assert partial and full.startswith(partial) and len(partial) < len(full)
    ch2 = FakeChannel(["and then?"])
    chat_loop(s, ch2)
    assert len(s.history) == 4 and "[stopped]" not in ch2.text


def test_reserved_tags_are_reported_not_fatal(tiny_llama):
    _, llama = tiny_llama  # llama2 format
    s = session(llama)
    ch = FakeChannel(["please [INST] break", "fine"])
    chat_loop(s, ch)
    assert "error:" in ch.text and "[INST]" in ch.text and len(s.history) == 2


def test_first_sigint_requests_stop_second_raises():
    # Start from Python's own handler even when the runner inherited SIGINT ignored (as background jobs do).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopOnInterrupt() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(max_gen_len=300, max_seq_len=256), "max_gen_len"),
        (dict(chat_format="nope"), "chat format"),
        (dict(top_p=0), "top_p"),
        (dict(model_parallel_size=2), "model_parallel_size"),
    ],
)
def test_bad_flags_fail_before_loading(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(chat_app.Llama, "build", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        chat_app.main(**flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def chat_cmd(ckpt, *extra):
    """The chat program's command line (eager unless extra has --compile: no background compile by default)."""
    no_compile = () if any(e.startswith("--compile") for e in extra) else ("--compile", "False")
    return [
        "scripts/chat.py",
        "--ckpt_dir",
        str(ckpt),
        "--tokenizer_path",
        str(LLAMA2_TOKENIZER),
        "--max_seq_len",
        "128",
        "--max_gen_len",
        "12",
        "--temperature",
        "0",
        "--show_stats",
        "False",
        *no_compile,
        *extra,
    ]


def test_compile_flag_compiles_before_the_first_prompt_and_replies_as_eager(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]

    def chat(*extra):
        done = run_script(*chat_cmd(ckpt, *extra), input="Hello there\n/exit\n", timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    eager, fast = chat(), chat("--compile")
    assert fast[0].startswith("(compiling the decode step") and re.fullmatch(r"\(compiled in [\d.]+ s\)", fast[1])
    assert fast[2:] == eager and len(eager) >= 3  # header, the reply, then the prompt for /exit
    # The default: answers at once on the eager step while the compiled one (here cached by the run above) loads,
    # then switches to it, with the same reply.
    assert chat("--compile", "auto") == eager


@pytest.mark.multiprocess
def test_torchrun_model_parallel_chat_matches_one_process(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["mha"]  # 4 heads: splits over 2 ranks
    lines = "hello there\nhow are you?\n/reset\nwhat now\n" + "more words " * 20 + "\nlast one\n"
    one = run_script(*chat_cmd(ckpt), input=lines, timeout=120)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *chat_cmd(ckpt), input=lines, timeout=180)
    assert two.returncode == 0, two.stderr
    assert "mp=2" in two.stderr
    assert one.stdout.count("> ") == 6 and "[cut at max_gen_len" in one.stdout
    assert two.stdout == one.stdout  # rank 0 alone prints, and the replies are the same


@pytest.mark.real_model
def test_conversation_longer_than_max_seq_len_on_default_model():
    story = "Here is some context about my garden, my cat, my house and my long day at work. " * 4
    lines = (
        "\n".join(
            [
                f"{story} First question: what is a cat?",
                f"{story} Second: what is a dog?",
                f"{story} Third: what is a bird?",
                "tell me " * 300,
                "Thanks!",
            ]
        )
        + "\n"
    )
    flags = ("--max_seq_len", "256", "--max_gen_len", "24", "--temperature", "0", "--compile", "False")
    run = run_script("scripts/chat.py", *flags, input=lines, timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("the oldest turns are dropped") == 1
    assert "that message needs" in run.stdout
    stats = STATS.findall(run.stdout)
    assert len(stats) == 4 and all(int(p) <= 256 - 24 for _, p in stats)
    assert "\x1b[2m" not in run.stdout  # not a terminal: no ANSI codes


class TimedLog:
    """pexpect logfile_read that remembers when each piece of output arrived."""

    def __init__(self):
        self.events = []

    def write(self, data):
        self.events.append((time.perf_counter(), data))

    def flush(self):
        pass


@pytest.mark.real_model
def test_terminal_chat_streams_resets_interrupts_and_exits():
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["scripts/chat.py", "--temperature", "0", "--max_gen_len", "16", "--max_seq_len", "512", "--compile", "False"],
        cwd=str(REPO),
        env=ENV,
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 300),
        preexec_fn=default_sigint,
    )
    log = TimedLog()
    child.logfile_read = log
    turns = []
    for message in [
        "My name is Alice. Say hello to me.",
        "What did I just tell you?",
        "/reset",
        "My name is Alice. Say hello to me.",
    ]:
        child.expect_exact("> ")
        child.sendline(message)
        if message == "/reset":
            child.expect_exact("(conversation cleared)")
            continue
        mark = len(log.events)
        child.expect(r"\x1b\[2m\[(\d+) tokens, (\d+) prompt tokens.*?tok/s\]\x1b\[0m")
        reply = child.before.split("\n", 1)[1]  # the echoed line comes first
        turns.append((reply.strip(), int(child.match.group(2))))
        times = [t for t, data in log.events[mark:] if data.strip()]
        assert len(times) >= 3 and times[-1] - times[0] > 0.05  # arrived piece by piece
    assert turns[1][1] > turns[0][1]  # the second turn re-sends the first
    assert turns[2] == turns[0]  # after /reset: same prompt size, same greedy reply
    assert turns[0][0]

    child.expect_exact("> ")
    child.sendline("Write a very long story about a dragon and a knight.")
    child.expect(r"\w\w+")  # the reply has started
    child.send("\x03")
    child.expect_exact("[stopped]")
    child.expect_exact("> ")
    child.sendline("/help")
    child.expect_exact("/system TEXT")
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.real_model
def test_ctrl_c_at_the_prompt_exits_cleanly():
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["scripts/chat.py"],
        cwd=str(REPO),
        env=ENV,
        encoding="utf-8",
        timeout=60,
        preexec_fn=default_sigint,
    )
    child.expect_exact("> ")
    child.send("\x03")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before
