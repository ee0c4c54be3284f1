"""The GGUF vocabulary as a tokenizer (llama_gen.convert.gguf_tokenizer): the same ids as transformers' GGUF
tokenizer, the tokenizer_config written, and the tokenizers refused."""

import json
from pathlib import Path

import pytest
from tiny_sources import CORPUS, GGUF_TYPES, tiny_hf_model, tiny_vocab, transformers, write_gguf
from tokenizers import Tokenizer

from llama_gen.convert import convert
from llama_gen.convert.gguf_tokenizer import gguf_tokenizer


def test_gguf_tokenizer_matches_transformers(tmp_path: Path) -> None:
    hf = tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab()), tie_word_embeddings=True)
    write_gguf(tmp_path / "tiny.gguf", hf, GGUF_TYPES)
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in CORPUS:
        assert ours.encode(text).ids == hf_tok.encode(text), text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert [config[k] for k in ("bos_token", "eos_token", "pad_token")] == ["<|im_start|>", "<|im_end|>", "<|im_end|>"]


def test_gguf_tokenizer_refuses_what_it_cannot_reproduce() -> None:
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.model 'llama' is not supported"):
        gguf_tokenizer(meta, Path("x.gguf"))
    meta = {**meta, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen9"}
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.pre = 'qwen9' is not supported"):
        gguf_tokenizer(meta, Path("x.gguf"))
