"""The fast path (fused projections, static-shape decode step, torch.compile, int8 weights) against the eager path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, TINY_CONFIGS
from test_engine import PROMPTS, build, stepwise_logits

from llama_gen import Llama
from llama_gen.fast import step as fast
from llama_gen.fast import quantize as int8_quantize
from llama_gen.fast.cpu import has_native_bf16_matmul
from llama_gen.fast.gemv import INT8_MAX_ROWS, GemvLinear, use_gemv_linears
from llama_gen.checkpoint import convert_weights, release_pages
from llama_gen.fast.memory import HUGE_PAGE, move_to_huge_pages
from llama_gen.fast.packed import PackedLinear, can_pack, pack_linears
from llama_gen.fast.quantize import Int8Linear, quantize_rows
from llama_gen.fast.step import FastForward, attention_window, cpu_weight_layout, fuse_projections
from llama_gen.model import ModelArgs, Transformer


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_fused_static_step_matches_eager(tiny_checkpoints, name):
    _, ckpt = tiny_checkpoints[name]
    llama = build(ckpt)
    torch.manual_seed(1)
    tokens = torch.randint(0, 32000, (3, 100))
    expected = llama.model.forward(tokens, 0)
    fuse_projections(llama.model)
    assert llama.model.layers[0].attention.wqkv is not None and not hasattr(llama.model.layers[0].attention, "wq")
    assert (llama.model.forward(tokens, 0) - expected).abs().max().item() <= 1e-5
    fast = FastForward(llama.model, compile=False)
    assert (stepwise_logits(fast, tokens, 20) - expected).abs().max().item() <= 1e-4


def test_prompts_in_chunks_match_one_forward(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(fast, "PREFILL_ROWS", 16)  # 3 prompts: chunks of 5 positions
    _, ckpt = tiny_checkpoints["gqa"]
    llama = build(ckpt)
    torch.manual_seed(2)
    tokens = torch.randint(0, 32000, (3, 23))
    expected = llama.model.forward(tokens, 0)
    chunked = FastForward(llama.model, compile=False)
    assert (chunked(tokens, 0) - expected).abs().max().item() <= 1e-5
    assert (chunked(tokens, 0, last_only=True) - expected[:, -1:]).abs().max().item() <= 1e-5
    assert (chunked(tokens[:, -1:], 23) - llama.model.forward(tokens[:, -1:], 23)).abs().max().item() <= 1e-5


def test_attention_window_covers_the_position():
    # dynamic windows (CPU): a multiple of 16
    assert [attention_window(p, 2048) for p in (0, 15, 16, 100, 2047)] == [16, 16, 32, 112, 2048]
    assert attention_window(100, 48) == 48
    # static windows (CUDA graphs): a power of two from 64
    assert [attention_window(p, 2048, static=True) for p in (0, 63, 64, 255, 256, 1500)] == [
        64,
        64,
        128,
        256,
        512,
        2048,
    ]
    assert attention_window(100, 48, static=True) == 48


@pytest.mark.parametrize("aot", [True, False], ids=["aot", "torch.compile"])
def test_compiled_greedy_equals_eager(tiny_checkpoints, monkeypatch, aot):
    monkeypatch.setenv("LLAMA_GEN_AOT", "1" if aot else "0")
    _, ckpt = tiny_checkpoints["gqa"]
    eager = build(ckpt)
    fast = build(ckpt, compile=True)
    assert fast.forward is not None and fast.forward.compiled
    assert (fast.forward.aot is not None) == aot
    expected, _ = eager.generate(PROMPTS, max_gen_len=12, temperature=0)  # 5 prompts: batches of 4 and 1
    got, _ = fast.generate(PROMPTS, max_gen_len=12, temperature=0)
    assert got == expected
    assert set(fast.forward.compile_seconds) == {(4, 0), (1, 0)}  # one dynamic-window graph per batch size
    layer = {"packed": PackedLinear, "gemv": GemvLinear, "plain": torch.nn.Linear}[cpu_weight_layout(fast.model)]
    assert any(type(m) is layer for m in fast.model.modules())  # the CPU's layout: Intel packed, else loops
    # logprobs and sampling with a seed go through the same compiled step
    a = eager.text_completion(["Hello"], max_gen_len=6, temperature=0.8, seed=3, logprobs=True)
    b = fast.text_completion(["Hello"], max_gen_len=6, temperature=0.8, seed=3, logprobs=True)
    assert a[0]["generation"] == b[0]["generation"]
    assert torch.allclose(torch.tensor(a[0]["logprobs"]), torch.tensor(b[0]["logprobs"]), atol=1e-4)


def test_generations_of_other_lengths_reuse_the_compiled_graphs(tiny_checkpoints, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LLAMA_GEN_AOT", "0")  # counts torch.compile's graphs (an AOT package has every window)

    _, ckpt = tiny_checkpoints["gqa"]
    fast = build(ckpt, compile=True, max_batch_size=2)
    fast.forward.warm_up((1, 2), max_pos=60)
    compiled = counters["stats"]["unique_graphs"]
    for prompts, n in [(PROMPTS[:2], 5), (PROMPTS[:2], 9), (PROMPTS[:1], 7), (PROMPTS[1:3], 11)]:
        fast.generate(prompts, max_gen_len=n, temperature=0)
    assert counters["stats"]["unique_graphs"] == compiled  # token columns of any stride, any length: no recompile


def test_quantize_rows_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert q.abs().max().item() == 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("prompt_dtype", [torch.bfloat16, torch.float32])  # with / without native bf16 matmuls
def test_int8_linear_matches_dequantized_weight(monkeypatch, prompt_dtype):
    monkeypatch.setattr(int8_quantize, "matmul_dtype", lambda: prompt_dtype)
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    int8 = Int8Linear.from_linear(linear, torch.float32)
    fused = Int8Linear.concat([int8, int8])
    for rows in (5, 40):  # a decode step's few rows (the int8 kernel) and a prompt's many (a dequantized matmul)
        x = torch.randn(2, rows, 96)
        reference = torch.nn.functional.linear(x, int8.weight.float() * int8.scales[:, None])
        # both CPU paths take bf16 activations: about bf16 precision
        assert torch.allclose(int8(x), reference, rtol=2e-2, atol=2e-2)
        assert torch.equal(fused(x), torch.cat([int8(x), int8(x)], dim=-1))


def test_int8_model_close_to_fp32(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    llama = build(ckpt)
    tokens = torch.tensor([PROMPTS[2]])
    expected = llama.model.forward(tokens, 0)
    quantized = build(ckpt, quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.model.modules())
    assert quantized.model.layers[0].feed_forward.w13 is not None  # fused after quantization
    got = quantized.model.forward(tokens, 0)
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.7  # random weights: close logits
    out, _ = quantized.generate(PROMPTS[:2], max_gen_len=6, temperature=0)
    assert all(len(o) == 6 for o in out)


def test_unknown_quantization_is_rejected(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["mha"]
    with pytest.raises(ValueError, match="int8"):
        build(ckpt, quantize="int3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_f_linear_eager_and_compiled(dtype):
    torch.manual_seed(0)
    weight = torch.randn(96, 64).to(dtype)
    if dtype == torch.bfloat16 and not has_native_bf16_matmul():  # e.g. an AVX2-only CPU: oneDNN cannot pack bf16
        assert not can_pack(weight)
        model = pack_linears(torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False, dtype=dtype)), batch_size=8)
        assert type(model[0]) is torch.nn.Linear
        return
    layer = PackedLinear(weight, batch_size=8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 64), (8, 64), (2, 5, 64)]:
        x = torch.randn(shape).to(dtype)
        expected = torch.nn.functional.linear(x.float(), weight.float())
        assert layer(x).dtype == dtype and layer(x).shape == (*shape[:-1], 96)
        assert (layer(x).float() - expected).abs().max().item() <= tol * expected.abs().max().item()
    compiled = torch.compile(lambda x: torch.relu(layer(x)) + 1, fullgraph=True)  # an opaque op: no graph break
    x = torch.randn(3, 64).to(dtype)
    assert torch.allclose(compiled(x).float(), torch.relu(layer(x)).float() + 1, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "native_bf16, intel, dtype, max_batch, layout",
    [
        (True, True, torch.bfloat16, 1, "gemv"),
        (True, False, torch.bfloat16, 4, "gemv"),  # native bf16: loops for
        (True, False, torch.bfloat16, 8, "packed"),  # few rows, packed for larger batches,
        (False, False, torch.bfloat16, 8, "gemv"),
        (False, False, torch.bfloat16, 1, "gemv"),  # else Inductor's loops
        (True, True, torch.float32, 8, "packed"),
        (True, True, torch.float32, 1, "plain"),  # Intel: MKL's gemv at batch 1
        (False, False, torch.float32, 1, "gemv"),
        (False, False, torch.float32, 8, "gemv"),  # others: loops for few rows,
        (False, False, torch.float32, 16, "packed"),  # packed beyond
        (True, True, torch.float16, 1, "plain"),
    ],
)
def test_cpu_weight_layout_follows_the_cpu(monkeypatch, native_bf16, intel, dtype, max_batch, layout):
    monkeypatch.setattr(fast, "has_native_bf16_matmul", lambda: native_bf16)
    monkeypatch.setattr(fast, "mkl_gemv_is_fastest", lambda: intel)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_batch_size=max_batch, max_seq_len=16)
    model = Transformer(args).to(dtype)
    assert fast.cpu_weight_layout(model) == layout
    model.to("meta")  # not a CPU model: library kernels
    assert fast.cpu_weight_layout(model) == "plain"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_linear_matches_f_linear_eager_and_compiled(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96, bias=False, dtype=dtype)
    model = use_gemv_linears(torch.nn.Sequential(layer, torch.nn.Linear(96, 8, bias=True)))
    assert isinstance(model[0], GemvLinear) and model[0].weight is layer.weight  # shared, not copied
    assert type(model[1]) is torch.nn.Linear  # bias: left as it is
    gemv = model[0]
    compiled = torch.compile(lambda x: torch.relu(gemv(x)) + 1, fullgraph=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for shape in [(1, 64), (8, 1, 64), (2, 4, 64), (20, 64)]:  # 20 rows: past MAX_ROWS, F.linear
        x = torch.randn(shape).to(dtype)
        assert torch.equal(gemv(x), torch.nn.functional.linear(x, layer.weight))  # eager: the library kernel
        expected = torch.relu(torch.nn.functional.linear(x.float(), layer.weight.float())) + 1
        got = compiled(x)
        assert got.dtype == dtype and got.shape == (*shape[:-1], 96)
        assert (got.float() - expected).abs().max().item() <= tol * expected.abs().max().item()


def test_int8_loops_match_the_dequantized_product():
    torch.manual_seed(0)
    q, scales = quantize_rows(torch.randn(96, 64))
    layer = Int8Linear(q, scales)
    compiled = torch.compile(lambda x: layer(x) + 1, fullgraph=True)
    for shape in [(1, 64), (1, 1, 64), (8, 64), (20, 64)]:
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x, q.float() * scales[:, None]) + 1
        got = compiled(x)
        # loops in float32 up to INT8_MAX_ROWS rows; beyond, and eagerly, PyTorch's kernels (bf16 activations)
        tol = 1e-5 if x.numel() // 64 <= INT8_MAX_ROWS else 1e-2
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= tol * expected.abs().max().item()
        assert (layer(x) + 1 - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()


def test_pack_linears_replaces_plain_layers_and_keeps_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(32, 8, bias=True))
    x = torch.randn(4, 16)
    expected = model(x)
    pack_linears(model, batch_size=4)
    assert isinstance(model[0], PackedLinear) and type(model[1]) is torch.nn.Linear  # bias: left as it is
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_convert_weights_converts_every_tensor_and_empties_the_source():
    state = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.float32)}
    expected = {k: v.to(torch.bfloat16) for k, v in state.items()}
    same = state["b"]
    converted = convert_weights(state, torch.bfloat16, torch.device("cpu"))
    assert state == {} and set(converted) == {"a", "b"}
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    assert convert_weights({"b": same}, torch.float32, torch.device("cpu"))["b"] is same  # no copy when it fits


def test_release_pages_keeps_the_data():
    t = torch.arange(3 * 4096, dtype=torch.float32)
    release_pages(t)  # anonymous memory: a no-op for the data
    assert torch.equal(t, torch.arange(3 * 4096, dtype=torch.float32))


def advised_huge(tensor: torch.Tensor) -> bool:
    """True when the mapping holding this tensor carries MADV_HUGEPAGE ("hg" in /proc/self/smaps VmFlags)."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return "hg" in fields[1:]
    return False


def test_move_to_huge_pages_keeps_outputs_sharing_and_embeddings(tmp_path):
    embedding = torch.nn.Embedding(100, 64)
    model = torch.nn.Sequential(
        embedding, torch.nn.Linear(64, 4096, bias=False), torch.nn.Linear(4096, 100, bias=False)
    )
    model[2].weight = torch.nn.Parameter(torch.randn(100, 4096))
    model.register_buffer("scale", torch.tensor([2.0]))
    shared = torch.nn.Linear(4096, 100, bias=False)
    shared.weight = model[2].weight
    model.append(shared)  # the same parameter held by two modules
    torch.save(model[1].weight.detach().clone(), tmp_path / "w.pt")
    model[1].weight = torch.nn.Parameter(torch.load(tmp_path / "w.pt", mmap=True, weights_only=True))  # mapped file
    tokens = torch.tensor([[1, 5, 7]])
    expected = model[2](model[1](model[0](tokens))) * model.scale
    table = embedding.weight.data_ptr()
    move_to_huge_pages(model)
    assert torch.equal(model[2](model[1](model[0](tokens))) * model.scale, expected)
    assert embedding.weight.data_ptr() == table  # read by rows: left in place
    assert model[3].weight is model[2].weight
    storages = {t.untyped_storage().data_ptr() for t in (model[1].weight, model[2].weight, model.scale)}
    assert len(storages) == 1  # one allocation ...
    assert min(t.data_ptr() for t in (model[1].weight, model[2].weight, model.scale)) % HUGE_PAGE == 0  # ... aligned
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert advised_huge(model[1].weight)


@pytest.mark.real_model
def test_default_model_fast_path_greedy_equals_eager():
    llama = Llama.build(max_seq_len=256, max_batch_size=3, device="cpu", dtype="float32")
    prompts = [
        llama.tokenizer.encode(p, bos=False, eos=False)
        for p in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ]
    expected, _ = llama.generate(prompts, max_gen_len=24, temperature=0)
    fuse_projections(llama.model)
    llama = Llama(llama.model, llama.tokenizer, llama.generation_config, forward=FastForward(llama.model, compile=False))
    got, _ = llama.generate(prompts, max_gen_len=24, temperature=0)
    assert got == expected


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_eager_decoding_never_imports_the_compiler(tiny_checkpoints, quantize):
    # torch._dynamo costs ~74 MiB resident; without compile=True nothing needs it (a fresh process: this one has it)
    _, ckpt = tiny_checkpoints["gqa"]
    code = (
        f"import sys; from llama_gen import Llama; "
        f"llama = Llama.build({str(ckpt)!r}, tokenizer_path={str(LLAMA2_TOKENIZER)!r}, max_seq_len=64, "
        f"max_batch_size=2, device='cpu', quantize={quantize!r}); "
        f"llama.text_completion(['Hello', 'A longer prompt'], max_gen_len=4, temperature=0.7, logprobs=True); "
        f"print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


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


def test_aot_step_with_packed_weights_equals_eager(tiny_checkpoints, monkeypatch):
    # Packed weights are reached through each layer's key buffer, bound when the package is loaded: the child
    # process that built the package numbered its layers from 0, this process (after the layer below) does not.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN: nothing to pack")
    PackedLinear(torch.randn(8, 8), batch_size=1)
    monkeypatch.setenv("LLAMA_GEN_AOT", "1")
    monkeypatch.setattr(fast, "cpu_weight_layout", lambda model: "packed")
    _, ckpt = tiny_checkpoints["gqa"]
    expected, _ = build(ckpt, max_batch_size=2).generate(PROMPTS[:2], max_gen_len=10, temperature=0)
    packed = build(ckpt, max_batch_size=2, compile=True)
    assert packed.forward.aot is not None and any(type(m) is PackedLinear for m in packed.model.modules())
    got, _ = packed.generate(PROMPTS[:2], max_gen_len=10, temperature=0)
    assert got == expected


def test_compiled_step_reaches_the_end_of_the_cache(tiny_checkpoints):
    # the last windows cover the whole cache (the exporter specializes that case unless the cache is padded)
    _, ckpt = tiny_checkpoints["gqa"]
    eager = build(ckpt, max_seq_len=40, max_batch_size=2)
    fast = build(ckpt, max_seq_len=40, max_batch_size=2, compile=True)
    expected, _ = eager.generate(PROMPTS[:2], max_gen_len=40, temperature=0)
    got, _ = fast.generate(PROMPTS[:2], max_gen_len=40, temperature=0)
    assert got == expected and max(len(p) + len(g) for p, g in zip(PROMPTS[:2], got)) == 40


def test_failed_ahead_of_time_build_falls_back_to_torch_compile(tiny_checkpoints, monkeypatch):
    from llama_gen.fast import aot

    def failing_build(spec):
        raise aot.AotBuildError("building the decode step ahead of time failed (exit 1)")

    monkeypatch.setenv("LLAMA_GEN_AOT", "1")
    monkeypatch.setattr(aot, "ensure_package", failing_build)
    _, ckpt = tiny_checkpoints["gqa"]
    fast = build(ckpt, compile=True, max_batch_size=1)
    expected, _ = build(ckpt, max_batch_size=1).generate(PROMPTS[:1], max_gen_len=8, temperature=0)
    with pytest.warns(UserWarning, match="in-process with torch.compile instead"):
        got, _ = fast.generate(PROMPTS[:1], max_gen_len=8, temperature=0)
    assert got == expected and fast.forward.aot is None
