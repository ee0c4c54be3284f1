"""Damaged files: each gives one line naming the file, what is wrong with it and what to do, in the programs (exit
status 2, no traceback) and as a ValueError (FileNotFoundError for a missing file) from the API."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LLAMA2_TOKENIZER, LLAMA3_TOKENIZER

from llama_gen import Llama
from llama_gen.apps import cli
from llama_gen.files import FIX


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def bad_json(path: Path) -> None:
    path.write_text('{"dim": 64, "n_layers": ')


# (case id, file damaged, how, what the one line says)
CHECKPOINT_DAMAGE: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("truncated shard", "consolidated.00.pth", truncate, "is truncated or not a PyTorch checkpoint"),
    ("random shard", "consolidated.00.pth", random_bytes, "is truncated or not a PyTorch checkpoint"),
    ("empty shard", "consolidated.00.pth", empty, "is empty"),
    ("bad params.json", "params.json", bad_json, "is not valid JSON"),
    ("empty params.json", "params.json", empty, "is empty"),
    ("list params.json", "params.json", lambda p: p.write_text("[1, 2]"), "holds a JSON list"),
    ("bad generation_config.json", "generation_config.json", bad_json, "is not valid JSON"),
    ("random tokenizer.model", "tokenizer.model", random_bytes, "is neither a sentencepiece model nor a tiktoken"),
    ("empty tokenizer.model", "tokenizer.model", empty, "is neither a sentencepiece model nor a tiktoken"),
]


@pytest.fixture
def checkpoint(tiny_checkpoints, tmp_path) -> Path:
    """Returns a copy of the tiny gqa checkpoint with its tokenizer.model (Llama 2's) and a generation config."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["gqa"][1], ckpt)
    shutil.copyfile(LLAMA2_TOKENIZER, ckpt / "tokenizer.model")
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": 0.5}))
    return ckpt


def program_error(capsys, argv: list[str]) -> str:
    """Returns the one line a program prints when it stops with status 2 (asserting it does)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case, name, damage, says", CHECKPOINT_DAMAGE, ids=[c[0] for c in CHECKPOINT_DAMAGE])
def test_damaged_checkpoint_files(checkpoint, tmp_path, capsys, monkeypatch, case, name, damage, says):
    monkeypatch.delenv("LLAMA_GEN_TRACEBACK", raising=False)
    damage(checkpoint / name)
    expected = f"{checkpoint / name} {says}"
    with pytest.raises(ValueError) as raised:
        Llama.build(str(checkpoint), max_seq_len=32, device="cpu", dtype="float32")
    message = str(raised.value)
    assert message.startswith(expected) and message.endswith(FIX) and "\n" not in message, message
    (tmp_path / "prompts.txt").write_text("Hello\n")
    command = ["complete", str(tmp_path / "prompts.txt"), "--ckpt_dir", str(checkpoint), "--max_seq_len", "32"]
    err = program_error(capsys, [*command, "--device", "cpu", "--output", str(tmp_path / "out.jsonl")])
    assert err == f"error: {message}\n"
    if name in ("consolidated.00.pth", "params.json"):  # what `info` reads: it no longer sizes a damaged checkpoint
        assert program_error(capsys, ["info", "--ckpt_dir", str(checkpoint)]) == f"error: {message}\n"


def test_wrong_tokenizer_and_missing_shard(checkpoint, capsys):
    with pytest.raises(ValueError, match="the tokenizer has 128256 tokens but .*params.json says vocab_size=32000: "):
        Llama.build(str(checkpoint), tokenizer_path=str(LLAMA3_TOKENIZER), device="cpu")
    (checkpoint / "consolidated.00.pth").rename(checkpoint / "consolidated.01.pth")  # shard 00 of 2 is missing
    err = program_error(capsys, ["info", "--ckpt_dir", str(checkpoint)])
    assert err == f"error: {checkpoint} has 1 shards but is missing consolidated.00.pth: copy the complete checkpoint\n"


@pytest.mark.parametrize("field", ["seed", "max_gen_len", "top_k"])
def test_booleans_are_refused_where_integers_belong(field):
    from llama_gen import GenerationOptions

    with pytest.raises(ValueError, match=f"{field} must be .*, got True"):
        GenerationOptions(**{field: True})


@pytest.mark.parametrize("field", ["seed", "max_batch_size", "max_seq_len"])
def test_build_refuses_booleans_before_loading(field, tmp_path):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= .*, got True"):
        Llama.build(str(tmp_path / "nothing here"), **{field: True})
