"""`llama-gen info`: sizes from params.json alone, checked against real checkpoints and allocated caches."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, REPO, TINY_CONFIGS

from llama_gen import Llama
from llama_gen.apps import cli
from llama_gen.apps.info import format_info, human, model_info


def checkpoint_numel(ckpt) -> int:
    state = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
    return sum(v.numel() for v in state.values())


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_parameter_count_matches_the_checkpoint(tiny_checkpoints, name):
    hf, ckpt = tiny_checkpoints[name]
    info = model_info(ckpt, str(LLAMA2_TOKENIZER), device="cpu")
    assert info["parameters"] == checkpoint_numel(ckpt) == sum(p.numel() for p in hf.parameters())
    w = info["weight_bytes"]
    assert (w["fp32"], w["bf16"], w["int8"], w["int4"]) == tuple(int(info["parameters"] * b) for b in (4, 2, 1, 0.5))


@pytest.mark.real_model
def test_default_model_counts():
    from llama_gen.convert import ensure_default_model

    info = model_info(max_seq_len=2048, max_batch_size=4, device="cpu", dtype="bf16")
    assert info["parameters"] == checkpoint_numel(ensure_default_model()) == 162_826_560
    assert info["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 2  # k and v, 30 layers, 3 KV heads of 64, bf16
    assert info["kv_cache_bytes"] == info["kv_cache_bytes_per_token"] * 2048 * 4


def test_kv_cache_matches_what_the_model_allocates(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    llama = Llama.build(
        ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), max_seq_len=96, max_batch_size=3, device="cpu", dtype="float32"
    )
    allocated = sum(layer.attention.cache_k.nbytes + layer.attention.cache_v.nbytes for layer in llama.model.layers)
    info = model_info(ckpt, str(LLAMA2_TOKENIZER), max_seq_len=96, max_batch_size=3, device="cpu", dtype="float32")
    assert info["kv_cache_bytes"] == allocated
    weights = sum(p.nbytes for p in llama.model.parameters())
    assert info["weight_bytes"]["fp32"] == weights


def test_no_weights_are_read_and_vocab_comes_from_the_tokenizer(tiny_checkpoints, tmp_path, monkeypatch):
    _, ckpt = tiny_checkpoints["mha"]
    params = json.loads((ckpt / "params.json").read_text())
    params["vocab_size"] = -1
    (tmp_path / "params.json").write_text(json.dumps(params))  # params only: there are no weights at all
    expected = checkpoint_numel(ckpt)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    info = model_info(tmp_path, str(LLAMA2_TOKENIZER), device="cpu")
    assert info["vocab_size"] == 32000
    assert info["parameters"] == expected
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        model_info(tmp_path, None, device="cpu")  # vocab -1 and no tokenizer next to params.json


def test_fits_against_available_memory(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    small = model_info(ckpt, str(LLAMA2_TOKENIZER), max_seq_len=128, max_batch_size=1, device="cpu")
    assert small["memory_source"] == "/proc/meminfo MemAvailable" and small["fits"] is True
    huge = model_info(ckpt, str(LLAMA2_TOKENIZER), max_seq_len=1 << 20, max_batch_size=1 << 12, device="cpu")
    assert huge["fits"] is False and "NO" in format_info(huge)
    assert huge["needed_bytes_per_rank"] == huge["weight_bytes"]["fp32"] + huge["kv_cache_bytes"]
    assert huge["prefill_logits_bytes"] == (1 << 20) * (1 << 12) * 32000 * 4
    assert huge["fits_with_prefill_logits"] is False
    split = model_info(ckpt, str(LLAMA2_TOKENIZER), model_parallel_size=2, device="cpu")
    assert split["kv_cache_bytes_per_token"] == small["kv_cache_bytes_per_token"] // 2  # 2 KV heads over 2 ranks
    with pytest.raises(ValueError, match="max_batch_size"):
        model_info(ckpt, str(LLAMA2_TOKENIZER), max_batch_size=0)


def test_human_sizes():
    assert human(512) == "512 B" and human(1536) == "1.50 KiB" and human(3 * 2**30) == "3.00 GiB"


def test_cli_and_script(tiny_checkpoints, capsys):
    _, ckpt = tiny_checkpoints["gqa"]
    cli.main(["info", "--ckpt_dir", str(ckpt), "--tokenizer_path", str(LLAMA2_TOKENIZER), "--json_output"])
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == checkpoint_numel(ckpt)
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "--ckpt_dir", str(ckpt.parent / "missing")])
    assert e.value.code == 2 and "params.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    run = subprocess.run(
        [
            sys.executable,
            "scripts/info.py",
            "--ckpt_dir",
            str(ckpt),
            "--tokenizer_path",
            str(LLAMA2_TOKENIZER),
            "--max_seq_len",
            "256",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "parameters" in run.stdout and "max_seq_len=256" in run.stdout and "fits" in run.stdout
    if shutil.which("llama-gen"):
        run = subprocess.run(["llama-gen", "--help"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "complete" in run.stdout
