"""llama_gen.fast.aot: the decode step built ahead of time in a child process, loaded without the compiler."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA2_TOKENIZER
from test_engine import PROMPTS, build

from llama_gen import Llama
from llama_gen.fast import layout
from llama_gen.fast.packed import PackedLinear
from llama_gen.model import ModelArgs, Transformer
from llama_gen.tokenizer import load_tokenizer


def test_aot_int8_step_matches_torch_compile_and_never_imports_the_compiler(tiny_checkpoints, tmp_path, monkeypatch):
    # The generating process loads the package built by a child process: the compiler is never imported.
    _, ckpt = tiny_checkpoints["gqa"]
    code = (
        f"import sys, torch; from llama_gen import Llama; "
        f"llama = Llama.build({str(ckpt)!r}, tokenizer_path={str(LLAMA2_TOKENIZER)!r}, max_seq_len=64, "
        f"max_batch_size=1, device='cpu', quantize='int8', compile=True); "
        f"assert llama.forward.aot is not None; "
        f"out = llama.text_completion(['Hello there'], max_gen_len=10, temperature=0, logprobs=True)[0]; "
        f"import json; print(json.dumps([out['generation'], out['logprobs']])); "
        f"print(any(m.startswith(('torch._inductor', 'torch._dynamo')) for m in sys.modules))"
    )
    env = {**os.environ, "LLAMA_GEN_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    output, imported = result.stdout.strip().splitlines()[-2:]
    assert imported == "False"
    assert "compiling the decode step ahead of time" in result.stderr and list(tmp_path.glob("aot/*.pt2"))
    # the same generation with torch.compile in this process (same Inductor loops, same numbers)
    monkeypatch.setenv("LLAMA_GEN_AOT", "0")
    llama = build(ckpt, compile=True, quantize="int8", max_seq_len=64, max_batch_size=1)
    assert llama.forward.aot is None
    expected = llama.text_completion(["Hello there"], max_gen_len=10, temperature=0, logprobs=True)[0]
    generation, logprobs = json.loads(output)
    assert generation == expected["generation"]
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(expected["logprobs"]), atol=1e-4)


def biased_model() -> Transformer:
    """Returns a tiny random model with Qwen2's q/k/v biases (O(1) values, so that they matter)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, max_batch_size=2)
    model = Transformer(dataclasses.replace(args, max_seq_len=64, qkv_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if name.endswith(".bias") else 0.08)
    return model


def test_aot_step_with_packed_weights_and_biases_equals_eager(monkeypatch):
    # Packed weights are reached through each layer's key buffer, bound when the package is loaded: the child
    # process that built the package numbered its layers from 0, this process (after the layer below) does not.
    # The model has Qwen2's q/k/v biases: the fused wqkv keeps them, packed, and the package binds them too.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN: nothing to pack")
    PackedLinear(torch.randn(8, 8), batch_size=1)
    monkeypatch.setenv("LLAMA_GEN_AOT", "1")
    monkeypatch.setattr(layout, "cpu_weight_layout", lambda model: "packed")  # the child gets it with the Layout
    tokenizer = load_tokenizer(LLAMA2_TOKENIZER)
    expected, _ = Llama.from_model(biased_model(), tokenizer).generate(PROMPTS[:2], max_gen_len=10, temperature=0)
    packed = Llama.from_model(biased_model(), tokenizer, compile=True)
    assert packed.forward.aot is not None and any(type(m) is PackedLinear for m in packed.model.modules())
    assert packed.model.layers[0].attention.wqkv.bias is not None
    got, _ = packed.generate(PROMPTS[:2], max_gen_len=10, temperature=0)
    assert got == expected


def untied_model(dtype: torch.dtype) -> Transformer:
    """Returns a tiny random model whose output layer is not its embedding (as in Llama 3 8B; the default model's are
    tied), with weights large enough for quantization errors to stay small against the logits' spread."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000)
    model = Transformer(dataclasses.replace(args, max_batch_size=2, max_seq_len=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model.to(dtype)


def untied_steps(dtype: torch.dtype, quantize: str) -> tuple[list[Llama], list[tuple[float, float]]]:
    """Runs an untied model eagerly and compiled ahead of time, teacher-forced on the same tokens (a prefill of 4,
    then 8 decode steps); returns both generators and, per step, (max |compiled - eager|, eager's spread)."""
    tokenizer = load_tokenizer(LLAMA2_TOKENIZER)
    eager = Llama.from_model(untied_model(dtype), tokenizer, quantize=quantize)
    compiled = Llama.from_model(untied_model(dtype), tokenizer, compile=True, quantize=quantize)
    assert compiled.forward.aot is not None
    tokens = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    steps = []
    for pos, width in [(0, 4)] + [(p, 1) for p in range(4, 12)]:
        e, g = (llama.forward(tokens[:, pos : pos + width], pos).float() for llama in (eager, compiled))
        steps.append(((g - e).abs().max().item(), e.std().item()))
    return [eager, compiled], steps


def test_aot_step_of_an_untied_group_wise_model_equals_eager(monkeypatch):
    # The child process builds placeholder weights: equal placeholders once tied the output layer to the embedding
    # there (group-wise quantization shares equal tables), and the step read the embedding from the output's tensors
    monkeypatch.setenv("LLAMA_GEN_AOT", "1")
    _, steps = untied_steps(torch.float32, "int4-g32")
    assert all(difference <= 1e-4 for difference, _ in steps)


def test_compiled_step_reaches_the_end_of_the_cache(tiny_checkpoints):
    # the last windows cover the whole cache (the exporter specializes that case unless the cache is padded)
    _, ckpt = tiny_checkpoints["gqa"]
    eager = build(ckpt, max_seq_len=40, max_batch_size=2)
    fast = build(ckpt, max_seq_len=40, max_batch_size=2, compile=True)
    expected, _ = eager.generate(PROMPTS[:2], max_gen_len=40, temperature=0)
    got, _ = fast.generate(PROMPTS[:2], max_gen_len=40, temperature=0)
    assert got == expected and max(len(p) + len(g) for p, g in zip(PROMPTS[:2], got)) == 40
