"""GGUF files written the way llama.cpp's convert_hf_to_gguf writes them (llama_gen.convert.gguf): logits against
transformers (also through its own GGUF loader) and the files refused."""

import json
from pathlib import Path

import pytest
import torch
from tiny_sources import (
    CORPUS,
    GGUF_TYPES,
    LLAMA3_ROPE,
    Q,
    gguf,
    load_ours,
    max_diff,
    tiny_hf_model,
    tiny_vocab,
    transformers,
    write_gguf,
)
from tokenizers import Tokenizer

from llama_gen.convert import convert
from llama_gen.convert.gguf import dequantize


@pytest.mark.parametrize(
    "overrides",
    [{"tie_word_embeddings": True}, {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}}],
    ids=["tied", "llama3-rope"],
)
def test_gguf_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    hf = tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab()), **overrides)
    rope = overrides.get("rope_parameters")
    types = {**GGUF_TYPES, "attn_output.weight": Q.BF16} if rope else GGUF_TYPES
    roundtrip = write_gguf(tmp_path / "tiny.gguf", hf, types, rope=rope)
    hf.load_state_dict(roundtrip)  # the reference sees exactly the quantized weights
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    tokens = torch.randint(0, hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    assert max_diff(hf, load_ours(out), tokens) <= 1e-4

    params = json.loads((out / "params.json").read_text())
    if rope:
        assert params["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
        return
    assert params["rope_scaling"] is None
    # Independent check of the GGUF layout: transformers' own GGUF loader reads the same file.
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert max_diff(hf_gguf.eval(), load_ours(out), tokens) <= 1e-4
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [2], "chat_format": "chatml"}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_qwen2_gguf_matches_transformers_gguf_loader(tmp_path: Path, tied: bool) -> None:
    hf = tiny_hf_model(arch="qwen2", intermediate_size=192, vocab_size=len(tiny_vocab()), tie_word_embeddings=tied)
    roundtrip = write_gguf(tmp_path / "tiny.gguf", hf, GGUF_TYPES, arch="qwen2")
    hf.load_state_dict(roundtrip)  # the reference sees exactly the quantized weights
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    assert json.loads((out / "params.json").read_text())["qkv_bias"] is True
    tokens = torch.randint(0, hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    assert max_diff(hf, load_ours(out), tokens) <= 1e-4
    # Independent: transformers' own GGUF loader (qwen2 tensors as they are, biases included) reads the same file.
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert type(hf_gguf).__name__ == "Qwen2ForCausalLM"
    assert max_diff(hf_gguf.eval(), load_ours(out), tokens) <= 1e-4
    # The "qwen2" pre-tokenizer (digits one by one) tokenizes as transformers' GGUF tokenizer does.
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in CORPUS:
        assert ours.encode(text).ids == hf_tok.encode(text), text


def test_gguf_rejects_unsupported_files(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'phi3' is not supported"):
        convert(tmp_path / "phi.gguf", tmp_path / "out")

    # A tensor type the gguf package cannot dequantize (Q8_1 is never written to files) is named in the error.
    write_gguf(tmp_path / "ok.gguf", tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab())), GGUF_TYPES)
    tensor = next(t for t in gguf.GGUFReader(str(tmp_path / "ok.gguf")).tensors if t.name == "blk.0.ffn_up.weight")
    with pytest.raises(NotImplementedError, match="blk.0.ffn_up.weight has type Q8_1"):
        dequantize(tensor._replace(tensor_type=Q.Q8_1), tmp_path / "ok.gguf")


def test_gguf_rejects_non_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        convert(tmp_path / "junk.gguf", tmp_path / "out")
