"""The entry point (llama_gen.convert.convert and scripts/convert.py): dispatch on the source, the dtype check."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_sources import REPO, tiny_hf_model

from llama_gen.convert import convert, convert_gguf, convert_hf


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    """Returns the finished run of ``python scripts/convert.py ARGS`` (output captured as text)."""
    command = [sys.executable, str(REPO / "scripts" / "convert.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True)


def test_convert_refuses_other_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a .gguf file"):
        convert(tmp_path, tmp_path / "out")
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a .gguf file"):
        convert(tmp_path / "model.bin", tmp_path / "out")


def test_bad_dtype_is_refused_before_any_work(tmp_path: Path) -> None:
    for fn in (convert, convert_hf, convert_gguf):
        with pytest.raises(ValueError, match="unknown dtype 'float8': use one of float32, .*bfloat16.*float16"):
            fn(tmp_path / "missing", tmp_path / "out", dtype="float8")
    assert not (tmp_path / "out").exists()
    tiny_hf_model().save_pretrained(tmp_path / "hf")
    result = run_script(tmp_path / "hf", tmp_path / "out", "--dtype", "float8")
    assert result.returncode == 2 and "use one of float32" in result.stderr
    assert not (tmp_path / "out").exists()
    # The short names of llama_gen.devices are accepted too.
    state = torch.load(
        convert(tmp_path / "hf", tmp_path / "ckpt", dtype="bf16") / "consolidated.00.pth", weights_only=True
    )
    assert state["norm.weight"].dtype == torch.bfloat16


def test_cli_converts(tmp_path: Path) -> None:
    tiny_hf_model().save_pretrained(tmp_path / "hf")
    result = run_script(tmp_path / "hf", tmp_path / "ckpt", "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "consolidated.00.pth", weights_only=True)
    assert state["norm.weight"].dtype == torch.float16


def test_damaged_sources_are_named_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """config.json and a safetensors file of a Hugging Face directory, and a truncated GGUF: ValueError from the API,
    one line and status 2 from `llama-gen convert` (scripts/convert.py runs the same main)."""
    from tiny_sources import GGUF_TYPES, tiny_vocab, write_gguf

    from llama_gen.apps import cli
    from llama_gen.files import FIX

    monkeypatch.delenv("LLAMA_GEN_TRACEBACK", raising=False)

    tiny_hf_model().save_pretrained(tmp_path / "hf")
    write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab())), GGUF_TYPES)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size * 2 // 3])
    cases = [
        (gguf, gguf, "is not a readable GGUF file"),
        (tmp_path / "hf", tmp_path / "hf" / "model.safetensors", "is truncated or not a safetensors file"),
        (tmp_path / "hf", tmp_path / "hf" / "config.json", "is not valid JSON"),
    ]
    safetensors = tmp_path / "hf" / "model.safetensors"
    safetensors.write_bytes(safetensors.read_bytes()[:1000])
    for src, damaged, says in cases:
        if damaged.name == "config.json":
            damaged.write_text('{"model_type": "llama",')
        with pytest.raises(ValueError) as raised:
            convert(src, tmp_path / "out")
        message = str(raised.value)
        assert message.startswith(f"{damaged} {says}") and message.endswith(FIX) and "\n" not in message, message
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            cli.main(["convert", str(src), str(tmp_path / "out")])
        assert stopped.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
