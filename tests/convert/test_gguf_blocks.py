"""GGUF Q8_0 / Q4_0 / Q4_1 blocks kept as they are (llama_gen.convert.gguf_blocks): logits against transformers on
the same dequantized weights, eager and compiled, and the sizes."""

import json
from pathlib import Path

import pytest
import torch
from tiny_sources import Q, tiny_hf_model, tiny_vocab, write_gguf

from llama_gen import Llama
from llama_gen.convert import convert
from llama_gen.convert.gguf_blocks import kind_schemes
from llama_gen.devices import has_native_bf16_matmul
from llama_gen.fast.columns import ColumnQuantLinear
from llama_gen.fast.groupwise import QuantEmbedding, QuantLinear
from llama_gen.fast.int4pack import Int4PackLinear
from llama_gen.fast.quantize import parse_scheme

BLOCK_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "attn_q.weight": Q.Q4_1,
    "attn_k.weight": Q.Q4_1,
    "attn_v.weight": Q.Q4_0,
    "attn_output.weight": Q.Q4_1,
    "ffn_gate.weight": Q.Q4_1,
    "ffn_up.weight": Q.Q4_0,
    "ffn_down.weight": Q.Q8_0,
}


def teacher_forced(forward, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of a prefill, then one decode step per token (the paths generation uses)."""
    steps = [forward(tokens[:, :prompt_len], 0)]
    steps += [forward(tokens[:, i : i + 1], i) for i in range(prompt_len, tokens.shape[1])]
    return torch.cat(steps, dim=1)


def test_q4_1_blocks_run_as_int4_with_llama_cpps_numbers(tmp_path: Path, monkeypatch) -> None:
    hf = tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab()), tie_word_embeddings=True)
    hf.load_state_dict(write_gguf(tmp_path / "tiny.gguf", hf, BLOCK_TYPES))  # the reference: dequantized weights
    out = convert(tmp_path / "tiny.gguf", tmp_path / "q", keep_quantized=True)
    scheme = parse_scheme(json.loads((out / "params.json").read_text())["quantization"])
    assert scheme == {
        **dict.fromkeys(scheme, "int4-g32"),
        "w2": "int8-g32",
        "output": "int8-g32",
        "embedding": "int8-g32",
    }
    float_dir = convert(tmp_path / "tiny.gguf", tmp_path / "f")
    assert (out / "consolidated.00.pth").stat().st_size < (float_dir / "consolidated.00.pth").stat().st_size / 4

    tokens = torch.randint(0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))  # one graph
    with torch.no_grad():
        expected = hf(tokens).logits.float()
    assert expected.std() > 0.3
    common = dict(max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    eager = Llama.build(str(out), **common)
    model = eager.model
    assert isinstance(model.tok_embeddings, QuantEmbedding) and isinstance(model.layers[0].attention.wq, QuantLinear)
    assert model.output.qweight is model.tok_embeddings.qweight  # tied: one copy (one tensor: huge pages keep it one)
    assert (eager.model.forward(tokens, 0) - expected).abs().max().item() <= 1e-3
    monkeypatch.setenv("LLAMA_GEN_AOT", "0")  # torch.compile in this process: the same Inductor loops, quicker here
    compiled = Llama.build(str(out), **common, compile=True)
    assert isinstance(compiled.model.output, ColumnQuantLinear)  # the decode loops' layout, tied embedding included
    assert compiled.model.tok_embeddings.qweight is compiled.model.output.qweight
    assert (teacher_forced(compiled.forward, tokens, 8) - expected).abs().max().item() <= 1e-3


@pytest.mark.skipif(not has_native_bf16_matmul(), reason="PyTorch's int4 CPU kernel needs native bf16 matmuls")
def test_q4_1_blocks_in_a_bf16_model_run_on_pytorchs_int4_kernel(tmp_path: Path, monkeypatch) -> None:
    hf = tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab()), tie_word_embeddings=True)
    hf.load_state_dict(write_gguf(tmp_path / "tiny.gguf", hf, BLOCK_TYPES))  # the reference: dequantized weights
    out = convert(tmp_path / "tiny.gguf", tmp_path / "q", keep_quantized=True)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
    monkeypatch.setenv("LLAMA_GEN_AOT", "0")  # torch.compile in this process: quicker here (test_int4pack: AOT)
    llama = Llama.build(str(out), max_seq_len=32, max_batch_size=1, device="cpu", dtype="bfloat16", compile=True)
    kernels = [m for m in llama.model.modules() if isinstance(m, Int4PackLinear)]
    assert len(kernels) == 3 * hf.config.num_hidden_layers  # wqkv, wo and w13 (Q4_0, Q4_1); w2 is Q8_0
    got = teacher_forced(llama.forward, tokens, 8).float()
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()  # bf16 activations


def test_float_tensors_stay_float_and_mixed_kinds_are_refused(tmp_path: Path) -> None:
    hf = tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab()))
    write_gguf(tmp_path / "tiny.gguf", hf, {**BLOCK_TYPES, "output.weight": Q.F16})
    out = convert(tmp_path / "tiny.gguf", tmp_path / "q", keep_quantized=True)
    assert parse_scheme(json.loads((out / "params.json").read_text())["quantization"])["output"] is None
    llama = Llama.build(str(out), max_seq_len=16, max_batch_size=1, device="cpu", dtype="float32")
    assert type(llama.model.output) is torch.nn.Linear
    with pytest.raises(ValueError, match="different tensor types"):
        kind_schemes({"layers.0.attention.wq.weight": "Q4_1", "layers.1.attention.wq.weight": "Q8_0"}, Path("x"))
    with pytest.raises(ValueError, match="only GGUF files"):
        convert(tmp_path, tmp_path / "x", keep_quantized=True)


@pytest.mark.real_model
def test_default_model_stays_4_bit_with_llama_cpps_numbers(tmp_path: Path) -> None:
    from llama_gen.convert import default_gguf, ensure_default_model

    float_dir = ensure_default_model()  # the GGUF dequantized to float32 by the gguf package
    out = convert(default_gguf(), tmp_path / "q4_1", keep_quantized=True)
    float_bytes = (float_dir / "consolidated.00.pth").stat().st_size
    assert (out / "consolidated.00.pth").stat().st_size <= float_bytes / 6
    common = dict(max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    q4, reference = Llama.build(str(out), **common), Llama.build(str(float_dir), **common)
    model = q4.model
    resident = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
    }
    weights = sum(resident.values())  # (the KV cache and rotary table are no parameters or buffers)
    assert weights <= float_bytes / 6
    tokens = torch.tensor(
        [q4.tokenizer.encode("The capital of France is Paris, and the capital of Italy is", bos=True, eos=False)]
    )
    assert (q4.model.forward(tokens, 0) - reference.model.forward(tokens, 0)).abs().max().item() <= 1e-3
