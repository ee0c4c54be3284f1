"""Hugging Face Llama directories (llama_gen.convert.hf): logits against transformers, the files written, and the
models refused."""

import json
from pathlib import Path

import pytest
import torch
from tiny_sources import CHATML, LLAMA3_ROPE, load_ours, max_diff, tiny_hf_model

from llama_gen.apps import cli
from llama_gen.convert import convert
from llama_gen.convert.hf import convert_hf, hf_rope
from llama_gen.convert.meta_checkpoint import expected_shapes, meta_ffn_hidden


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_theta": 10000.0},
        {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}, "num_key_value_heads": 1},
    ],
    ids=["gqa", "tied-mha", "llama3-rope-mqa"],
)
def test_hf_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    hf = tiny_hf_model(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    params = json.loads((out / "params.json").read_text())
    assert meta_ffn_hidden(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == 172
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = load_ours(out)
    assert max_diff(hf, ours, tokens) <= 1e-4

    if "rope_parameters" in overrides:
        assert params["rope_theta"] == 500000.0
        assert params["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    if not overrides:
        # Control: HF's q/k rows used as they are (no un-permutation) must visibly break the model.
        state = torch.load(out / "consolidated.00.pth", weights_only=True)
        for i in range(2):
            state[f"layers.{i}.attention.wq.weight"] = hf.model.layers[i].self_attn.q_proj.weight.detach().clone()
            state[f"layers.{i}.attention.wk.weight"] = hf.model.layers[i].self_attn.k_proj.weight.detach().clone()
        ours.load_state_dict(state)
        assert max_diff(hf, ours, tokens) > 1e-2


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1, "rope_theta": 1e6}),
        ("qwen2", {"use_sliding_window": False, "sliding_window": 16}),  # Qwen2 configs name a window they don't use
        ("mistral", {"sliding_window": None}),
        ("mistral", {"sliding_window": 4096, "max_position_embeddings": 4096}),  # a window as long as the context
    ],
    ids=["qwen2-gqa-untied", "qwen2-mqa-tied", "qwen2-window-off", "mistral", "mistral-window-whole-context"],
)
def test_qwen2_and_mistral_logits_match_transformers(tmp_path: Path, arch: str, overrides: dict) -> None:
    hf = tiny_hf_model(arch=arch, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "ckpt")
    params = json.loads((out / "params.json").read_text())
    assert params.get("qkv_bias", False) == (arch == "qwen2")
    assert params["rope_theta"] == overrides.get("rope_theta", hf.config.rope_parameters["rope_theta"])
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = load_ours(out)
    assert max_diff(hf, ours, tokens) <= 1e-4
    if arch == "qwen2":  # control: the biases matter (dropping them visibly breaks the model)
        state = {k: v for k, v in torch.load(out / "consolidated.00.pth", weights_only=True).items()}
        ours.load_state_dict({k: torch.zeros_like(v) if k.endswith(".bias") else v for k, v in state.items()})
        assert max_diff(hf, ours, tokens) > 1e-2


def test_hf_checkpoint_file_format(tmp_path: Path) -> None:
    hf = tiny_hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    out = convert_hf(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    state = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in state.values())
    assert set(state) == set(expected_shapes(json.loads((out / "params.json").read_text())))
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    output, embedding = state["output.weight"], state["tok_embeddings.weight"]
    assert output.untyped_storage().data_ptr() != embedding.untyped_storage().data_ptr()  # a copy, not shared
    assert set(json.loads((out / "params.json").read_text())) == {
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "multiple_of",
        "ffn_dim_multiplier",
        "norm_eps",
        "rope_theta",
        "rope_scaling",
    }


def test_hf_sharded_and_bin_weights_convert_identically(tmp_path: Path) -> None:
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ref = torch.load(convert(tmp_path / "single", tmp_path / "a") / "consolidated.00.pth", weights_only=True)
    for name in ("sharded", "bin"):
        out = convert(tmp_path / name, tmp_path / f"out-{name}")
        got = torch.load(out / "consolidated.00.pth", weights_only=True)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_hf_tokenizer_and_generation_config(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    tiny_hf_model().save_pretrained(src)
    (src / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 3], "max_length": 99})
    )
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    (src / "tokenizer.json").write_text("{}")
    out = convert(src, tmp_path / "ckpt")
    assert json.loads((out / "generation_config.json").read_text()) == {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "eos_token_id": [2, 3],
        "chat_format": "chatml",
    }
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_hf_rope_reads_transformers_4_configs() -> None:
    old_style = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3_ROPE, "rope_type": "llama3"}}
    assert hf_rope(old_style, Path("x")) == (500000.0, {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"})
    assert hf_rope({"rope_theta": 1e6, "rope_scaling": None}, Path("x")) == (1e6, None)
    assert hf_rope({}, Path("x")) == (10000.0, None)


def test_hf_rejects_unsupported_models(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LLAMA_GEN_TRACEBACK", raising=False)
    src = tmp_path / "hf"
    tiny_hf_model().save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(ValueError, match="model_type 'gemma' is not supported"):
        convert(src, tmp_path / "out")
    # Mistral v0.1 attends over a sliding window of 4096 positions of its 32768: refused, with the reason.
    mistral = {**config, "model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}
    (src / "config.json").write_text(json.dumps(mistral))
    with pytest.raises(NotImplementedError, match="sliding_window=4096 .* not supported"):
        convert(src, tmp_path / "out")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:  # the program: that reason in one line, no traceback
        cli.main(["convert", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "sliding_window" in err
    (src / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "head_dim": 32}))
    with pytest.raises(NotImplementedError, match="head_dim 32"):
        convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(NotImplementedError, match="'yarn'"):
        convert(src, tmp_path / "out")
