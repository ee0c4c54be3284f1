"""What the tests of llama_gen.convert convert: tiny random Hugging Face Llama models, tiny GGUFs written the way
llama.cpp's convert_hf_to_gguf writes them, a byte-level BPE vocabulary, and the checks against transformers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_gen.convert.gguf_tokenizer import bytes_to_unicode
from llama_gen.convert.meta_checkpoint import GLOBAL_TENSORS, LAYER_TENSORS
from llama_gen.model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

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


HF_CLASSES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}  # model_type -> transformers' class prefix


def tiny_hf_model(seed: int = 0, arch: str = "llama", **overrides) -> "transformers.PreTrainedModel":
    """Returns a random fp32 LlamaForCausalLM (Qwen2ForCausalLM, MistralForCausalLM for ``arch``) whose weights give
    O(1) logits and non-uniform attention (Qwen2's q/k/v biases random too)."""
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
    prefix = HF_CLASSES[arch]
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
            elif p.ndim == 1:
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
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ Ġ", "e r", "Ġ a", "o n"]


def tiny_vocab() -> list[str]:
    """Returns a byte-level BPE vocabulary: 3 specials, the 256 byte symbols, then one token per merge."""
    return SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_gguf(path: Path, model, types: dict[str, Q], rope: dict | None = None, arch: str = "llama") -> dict:
    """Writes ``model`` as llama.cpp's convert_hf_to_gguf would (llama: q/k permuted; qwen2: as they are, biases
    in F32, pre-tokenizer "qwen2"; tensors quantized per ``types``, keyed by GGUF suffix), and returns the HF state
    dict as it reads back after the quantization round trip."""
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
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    names = {hf: gg for _, (hf, gg) in GLOBAL_TENSORS.items()}
    names.update(
        {
            f"model.layers.{i}.{hf}": f"blk.{i}.{gg}"
            for i in range(cfg.num_hidden_layers)
            for _, (hf, gg) in LAYER_TENSORS.items()
        }
    )
    back = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gg_name = names[hf_name]
        kind = gg_name.split(".", 2)[-1] if gg_name.startswith("blk.") else gg_name
        data, heads = tensor.numpy(), None
        if arch != "llama":
            pass  # qwen2: llama.cpp rotates halves (NEOX) and keeps Hugging Face's q/k rows
        elif kind == "attn_q.weight":
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


def write_tiny_tokenizer(directory: Path, chat_template: str = CHATML) -> None:
    """Writes tiny_vocab as a byte-level BPE tokenizer.json (+ tokenizer_config.json: ChatML, eos <|im_end|>, no
    bos) into a Hugging Face model directory, as Qwen2's tokenizer files are laid out."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tiny_vocab())}
    tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split()) for m in MERGES]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"chat_template": chat_template, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": SPECIALS[0]}
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
