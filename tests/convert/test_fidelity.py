"""A Qwen2 Hugging Face directory end to end (scripts/convert.py, Llama.build) against transformers: logits, the
generation_config.json semantics (do_sample, transformers' defaults), max_window_size, skip_special_tokens."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_sources import REPO, tiny_hf_model, tiny_vocab, transformers, write_tiny_tokenizer

from llama_gen import GenerationOptions, Llama
from llama_gen.convert import convert
from llama_gen.options import LIBRARY_DEFAULTS
from llama_gen.serve.chat import ChatSession

VOCAB = len(tiny_vocab())
GREEDY_CONFIG = {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "max_new_tokens": 12, "eos_token_id": 2}


def qwen2_directory(path: Path, generation_config: dict | None = None, **overrides) -> "transformers.PreTrainedModel":
    """Writes a tiny random Qwen2 model (tokenizer files and generation_config.json included) into path; returns it."""
    hf = tiny_hf_model(arch="qwen2", vocab_size=VOCAB, intermediate_size=192, **overrides)
    hf.save_pretrained(path)
    write_tiny_tokenizer(path)
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return hf


def convert_with_script(src: Path, out: Path) -> Path:
    """Returns out after `python scripts/convert.py src out` (as a user runs it)."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "convert.py"), str(src), str(out)], text=True,
                          capture_output=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def build(ckpt: Path, **kw) -> Llama:
    return Llama.build(str(ckpt), max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> tuple:
    """Returns (transformers' model as it loads from the directory, our Llama) for a tied Qwen2 with a greedy
    generation config and Qwen's max_window_size."""
    root = tmp_path_factory.mktemp("qwen2")
    qwen2_directory(root / "hf", {**GREEDY_CONFIG, "max_window_size": 24}, tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    return hf, build(convert_with_script(root / "hf", root / "ckpt"))


def test_qwen2_through_the_script_and_build_matches_transformers(qwen2) -> None:
    hf, llama = qwen2
    assert llama.model.args.qkv_bias and llama.chat_format == "chatml"
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert expected.std() > 0.3
    assert (llama.model.forward(tokens, 0) - expected).abs().max().item() <= 1e-4


def test_do_sample_false_is_greedy_as_transformers_generate(qwen2) -> None:
    hf, llama = qwen2
    assert hf.generation_config.do_sample is False and hf.generation_config.temperature == 0.7
    prompt = llama.tokenizer.encode("Hello, the quick brown fox", bos=False, eos=False)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    expected = out[0, len(prompt) :].tolist()
    expected = expected[: expected.index(2)] if 2 in expected else expected  # ours stops before the eos
    tokens, _ = llama.generate([prompt])  # no arguments: the checkpoint's config (greedy, max_new_tokens 12)
    assert tokens[0] == expected and len(expected) > 3
    assert llama.resolve(GenerationOptions()).params.temperature == 0
    # An explicit temperature still samples (the call's arguments win over the config).
    assert llama.resolve(GenerationOptions(temperature=0.7)).params.temperature == 0.7


def test_fields_left_out_take_transformers_defaults(tmp_path: Path) -> None:
    qwen2_directory(tmp_path / "hf", {"do_sample": True, "eos_token_id": 2})
    # What transformers' generate() uses: the file's values over its defaults for the fields left out (None).
    given = transformers.GenerationConfig.from_pretrained(tmp_path / "hf").to_dict()
    hf = {**transformers.GenerationConfig._get_default_generation_params(), **{k: v for k, v in given.items() if v}}
    llama = build(convert(tmp_path / "hf", tmp_path / "ckpt"))
    params = llama.resolve(GenerationOptions()).params
    ours = (params.temperature, params.top_p, params.top_k, params.repetition_penalty)
    assert ours == (hf["temperature"], hf["top_p"], hf["top_k"], hf["repetition_penalty"]) == (1.0, 1.0, 50, 1.0)
    assert hf["do_sample"] is True
    # A Meta-style checkpoint (no do_sample in its generation_config.json) keeps the reference's defaults.
    config = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    del config["do_sample"]
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps(config))
    params = build(tmp_path / "ckpt").resolve(GenerationOptions()).params
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 0) == tuple(LIBRARY_DEFAULTS.values())[:3]


def test_max_window_size_bounds_the_chat_prompt(qwen2) -> None:
    _, llama = qwen2
    session = ChatSession(llama, max_gen_len=8)
    assert session.max_prompt_len == 24  # max_window_size, below max_seq_len - max_gen_len = 56
    with pytest.raises(ValueError, match="prompt window is 24"):
        session.send("the quick brown fox " * 4)
    session.reply("Hi")  # a short turn fits
    assert len(session.history) == 2


def test_skip_special_tokens(qwen2) -> None:
    """A model whose output rows are swapped so that greedy decoding writes <|im_start|> first: it is left out of the
    text unless asked for (as transformers' decode(skip_special_tokens=...) does)."""
    _, llama = qwen2
    prompt = "Hello, the quick brown fox"
    first = llama.generate([llama.encode_prompt(prompt)], max_gen_len=1, temperature=0)[0][0][0]
    special = llama.tokenizer.special_id("<|im_start|>")
    assert first != special
    weight = llama.model.output.weight
    with torch.no_grad():  # the logits of the two ids trade places
        weight[[first, special]] = weight[[special, first]].clone()
    try:
        ids = llama.generate([llama.encode_prompt(prompt)], max_gen_len=6, temperature=0)[0][0]
        assert ids[0] == special
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(llama.tokenizer.path)))
        for skip in (True, False):
            text = llama.text_completion([prompt], max_gen_len=6, temperature=0, skip_special_tokens=skip)
            assert text[0]["generation"] == hf_tok.decode(ids, skip_special_tokens=skip)
            assert ("<|im_start|>" in text[0]["generation"]) is not skip
    finally:
        with torch.no_grad():
            weight[[first, special]] = weight[[special, first]].clone()
