"""Shared fixtures: tiny random Hugging Face Llama models converted to Meta-style checkpoints on the fly."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2_tokenizer.model"
LLAMA3_TOKENIZER = SHARED_DATA / "llama3_tokenizer.model"

TINY_CONFIGS = {
    "mha": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=192
    ),
    "gqa": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=176
    ),
    # intermediate size from Meta's formula with ffn_dim_multiplier=1.3, multiple_of=32
    "ffn_multiplier": dict(
        hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, intermediate_size=352
    ),
    "llama31_rope": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


def make_hf_llama(name: str, vocab_size: int = 32000, seed: int = 0):
    """Returns a random fp32 transformers LlamaForCausalLM for one of TINY_CONFIGS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **TINY_CONFIGS[name],
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform logits; a larger scale makes greedy decoding decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Returns {name: (hf_model, meta_ckpt_dir)} for every tiny config, converted with llama_gen.convert."""
    from llama_gen.convert import convert_hf

    out = {}
    for name in TINY_CONFIGS:
        hf = make_hf_llama(name)
        hf_dir = tmp_path_factory.mktemp(f"hf_{name}")
        hf.save_pretrained(hf_dir)
        ckpt = convert_hf(hf_dir, tmp_path_factory.mktemp(f"meta_{name}"))
        out[name] = (hf, Path(ckpt))
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints):
    """Returns (hf_model, Llama) for the grouped-query tiny config, with the real Llama 2 tokenizer."""
    from llama_gen import Llama

    hf, ckpt = tiny_checkpoints["gqa"]
    llama = Llama.build(
        ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), max_seq_len=128, max_batch_size=4, device="cpu", dtype="float32"
    )
    return hf, llama


def fail_second_step(engine, monkeypatch) -> None:
    """Makes the engine's second decode step raise (as running out of memory would); the others run as usual."""
    calls = {"n": 0}
    real = engine.calls.step.decode_rows

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(engine.calls.step, "decode_rows", failing)
