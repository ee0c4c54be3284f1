"""Hugging Face Llama, Mistral and Qwen2 directories (config.json + safetensors or pytorch_model*.bin) -> Meta
checkpoint directories (Qwen2's q/k/v biases kept as ``attention.w{q,k,v}.bias``, params.json ``qkv_bias``).

Meta rotates interleaved pairs (x[2i], x[2i+1]) of each head, Hugging Face rotates halves (x[i], x[i + hd/2]), so
HF's q/k rows (and q/k biases) are a per-head permutation of Meta's and get un-permuted here (checked against
transformers in tests/convert/test_hf.py).
"""

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llama_gen import files
from llama_gen.convert.chat_template import chat_settings
from llama_gen.convert.meta_checkpoint import (
    HF,
    build_state_dict,
    checkpoint_dtype,
    meta_names,
    meta_params,
    write_checkpoint,
)

# generation_config.json keys carried over (do_sample marks transformers' semantics; max_window_size: Qwen's bound
# on the prompt window of a chat)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "max_window_size")
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
MODEL_TYPES = ("llama", "mistral", "qwen2")  # Llama-shaped decoders; qwen2 adds biases on q, k and v


def convert_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Converts a Hugging Face Llama/Mistral/Qwen2 directory (config.json + safetensors/bin) to a Meta checkpoint;
    returns out_dir."""
    torch_dtype = checkpoint_dtype(dtype)
    src, out_dir = Path(hf_dir), Path(out_dir)
    config = read_json(src / "config.json", required=True)
    params = hf_params(config, src)
    paths = hf_weight_files(src)
    check_weight_files(paths)  # a damaged file is named before the conversion starts
    tensors = meta_tensors(paths, params, src)
    state = build_state_dict(tensors, params, torch_dtype, src, tied=bool(config.get("tie_word_embeddings", False)))
    write_checkpoint(out_dir, params, state, hf_generation_config(src, config))
    del state
    copy_tokenizer(src, out_dir)
    return out_dir


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    """Returns the parsed JSON object in ``path``, or {} if there is none (FileNotFoundError if ``required``); a
    damaged file raises ValueError naming it."""
    return files.read_json(path) if required or path.is_file() else {}


def hf_rope(config: dict[str, Any], src: Path) -> tuple[float, dict[str, Any] | None]:
    """Returns (rope_theta, Meta rope_scaling or None) from a config.json (old rope_scaling or new rope_parameters)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise NotImplementedError(
            f"{src / 'config.json'}: rope type {rope_type!r} is not supported (only default and Llama 3.1 'llama3')"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: rope[k] for k in keys}


def check_supported(config: dict[str, Any], where: Path) -> None:
    """Raises unless config.json describes a model llama_gen's Transformer can run."""
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {config.get('model_type')!r} is not supported; only Llama-architecture "
            f"checkpoints (model_type {', '.join(map(repr, MODEL_TYPES))}) can be converted"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise NotImplementedError(
            f"{where}: attention_bias/mlp_bias (biases on every projection) are not supported by llama_gen's model "
            "(only Qwen2's biases on q, k and v)"
        )
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and window < config.get("max_position_embeddings", window + 1):
        raise NotImplementedError(
            f"{where}: sliding_window={window} (attention limited to the last {window} positions) is not supported: "
            "llama_gen attends over the whole context, which changes this model's output past that length; "
            "Mistral v0.2 and later (sliding_window null) convert"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        raise NotImplementedError(
            f"{where}: head_dim {head_dim} differs from hidden_size // num_attention_heads = {dim // n_heads}, "
            "which llama_gen's model assumes"
        )


def hf_params(config: dict[str, Any], src: Path) -> dict[str, Any]:
    """Returns Meta params.json contents for a Hugging Face Llama/Mistral/Qwen2 config.json, or raises for
    unsupported models."""
    check_supported(config, src / "config.json")
    n_heads = config["num_attention_heads"]
    shape = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "vocab_size": config["vocab_size"],
    }
    eps, qkv_bias = config.get("rms_norm_eps", 1e-6), config["model_type"] == "qwen2"
    return meta_params(shape, config["intermediate_size"], eps, *hf_rope(config, src), qkv_bias=qkv_bias)


def hf_weight_files(src: Path) -> list[Path]:
    """Returns the safetensors (preferred) or pytorch_model*.bin files holding a HF checkpoint's weights."""
    for pattern, index in (
        ("*.safetensors", "model.safetensors.index.json"),
        ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
    ):
        if (src / index).is_file():
            return sorted({src / f for f in read_json(src / index)["weight_map"].values()})
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model*.bin weight files found")


def check_weight_files(paths: list[Path]) -> None:
    """Raises ValueError naming the first weight file that cannot be opened (truncated, empty, not weights)."""
    from safetensors import SafetensorError, safe_open

    for path in paths:
        if path.suffix != ".safetensors":
            files.load_shard(path)
            continue
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as e:
            raise files.damaged(path, "is truncated or not a safetensors file", e) from e


def iter_hf_tensors(paths: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor) for every tensor in the weight files, loading one tensor at a time."""
    from safetensors import safe_open

    for path in paths:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = files.load_shard(path)
            yield from state.items()
            del state


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Returns HF q/k projection rows (a weight, or a bias) reordered per head from rotate-half to Meta's
    interleaved-pair layout.

    Inverse of ``permute`` in transformers' convert_llama_weights_to_hf.py (which views Meta rows as
    [n_heads, hd/2, 2] and swaps the last two); same operation as llama.cpp's ``LlamaModel.permute``.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def rotate_half_to_meta(name: str, tensor: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Returns a Meta-named tensor from a rotate-half source (HF; Qwen2 GGUFs): q/k rows un-permuted, others as
    they are."""
    kind = name.split(".")[-2]  # wq, wk, ... of "layers.{i}.attention.wq.weight" / ".bias"
    if kind in ("wq", "wk") and name.startswith("layers."):
        return hf_to_meta_qk(tensor, params["n_heads" if kind == "wq" else "n_kv_heads"])
    return tensor


def meta_tensors(files: list[Path], params: dict[str, Any], src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (Meta name, tensor) for the tensors of the weight files, q/k rows in Meta's rotary layout."""
    names = meta_names(params["n_layers"], HF, "model.layers.{i}.")
    for hf_name, tensor in iter_hf_tensors(files):
        if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved; recomputed by the model
            continue
        if hf_name not in names:
            raise ValueError(f"{src}: unexpected tensor {hf_name} (not part of a plain Llama model)")
        yield names[hf_name], rotate_half_to_meta(names[hf_name], tensor, params)


def hf_generation_config(src: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Returns our generation_config.json: do_sample (transformers' default False when left out: greedy), the HF
    sampling keys present, eos ids and the chat format."""
    hf = read_json(src / "generation_config.json")
    out = {"do_sample": bool(hf.get("do_sample", False))}
    out.update({k: hf[k] for k in SAMPLING_KEYS if hf.get(k) is not None})
    eos = hf.get("eos_token_id", config.get("eos_token_id"))
    out["eos_token_id"] = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    template = read_json(src / "tokenizer_config.json").get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    return {**out, **chat_settings(template)}


def copy_tokenizer(src: Path, out_dir: Path) -> None:
    """Copies the tokenizer files of ``src`` into out_dir, warning when neither a tokenizer.json nor a
    tokenizer.model is among them."""
    copied = [name for name in HF_TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, out_dir / name)
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model")):
        print(f"warning: {src} has no tokenizer.json or tokenizer.model; {out_dir} has no tokenizer", file=sys.stderr)
