"""Sizes a checkpoint from its params.json alone: parameters, weight memory, KV cache, and whether it fits.

    llama-gen info [--ckpt_dir DIR] [--max_seq_len 2048] [--max_batch_size 4] [--device cuda] [--dtype bf16]

No weights are loaded (the shards, if any, are opened memory-mapped, so a missing or damaged one is reported rather
than sized); the tokenizer is read only when params.json says vocab_size=-1.
"""

import json
from pathlib import Path

import torch

from llama_gen.apps.errors import friendly_errors
from llama_gen.apps.flags import MODEL_FLAGS, Flag, check_model_flags, select, takes
from llama_gen.checkpoint import find_shards, kv_replication, open_shards, read_params
from llama_gen.devices import DTYPES, SHORT_NAMES, resolve_device, resolve_dtype
from llama_gen.model import ModelArgs

WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}  # bytes per parameter, scales not counted
SIZING_FLAGS = select(
    MODEL_FLAGS,
    ["ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "device", "dtype", "model_parallel_size"],
    max_batch_size=4,
    model_parallel_size=1,
)
JSON_FLAG = Flag("json_output", False, bool, "print the figures as one JSON object")


def count_parameters(args: ModelArgs) -> int:
    """Returns the number of parameters of the model params.json describes (embedding and output counted apart)."""
    d, hd, f = args.dim, args.head_dim, args.ffn_hidden_dim
    attention = d * args.n_heads * hd * 2 + d * args.kv_heads * hd * 2  # wq, wo, wk, wv
    layer = attention + 3 * d * f + 2 * d  # w1, w2, w3, two norms
    return args.n_layers * layer + 2 * args.vocab_size * d + d  # + embedding, output, final norm


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int, model_parallel_size: int = 1) -> int:
    """Returns the KV-cache bytes one token takes on one model-parallel rank (keys and values, all layers)."""
    heads = args.kv_heads * kv_replication(args.kv_heads, model_parallel_size) // model_parallel_size
    return 2 * args.n_layers * heads * args.head_dim * dtype_bytes


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Returns (bytes free on device or None if unknown, where the number comes from)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, "CUDA not available"
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"torch.cuda.mem_get_info({device})"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
        except OSError:
            pass
        return None, "/proc/meminfo not readable"
    return None, f"no memory query for {device.type}"


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """Returns the bytes of a checkpoint's tensors as loaded (each storage once: a tied output layer shares the
    embedding's); only the headers are read (memory-mapped)."""
    storages = {}
    for path in find_shards(ckpt_dir):
        for tensor in torch.load(path, map_location="cpu", weights_only=True, mmap=True).values():
            storages[(path, tensor.untyped_storage().data_ptr())] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def read_vocab_size(params: dict, ckpt_dir: Path, tokenizer_path: str | None) -> int:
    """Returns params' vocab_size, or the tokenizer's size when params.json says -1."""
    vocab = params.get("vocab_size", -1)
    if vocab == -1:
        from llama_gen.tokenizer import load_tokenizer

        vocab = load_tokenizer(tokenizer_path or ckpt_dir).n_words
    return vocab


@takes(SIZING_FLAGS)
def model_info(values: dict) -> dict:
    """Returns a dict of sizes (bytes) for a checkpoint, run settings and device, and whether they fit."""
    check_model_flags(values)
    ckpt_dir, tokenizer_path = values["ckpt_dir"], values["tokenizer_path"]
    max_seq_len, max_batch_size = values["max_seq_len"], values["max_batch_size"]
    if ckpt_dir is None:
        from llama_gen.convert import ensure_default_model

        ckpt_dir = ensure_default_model()
    ckpt_dir = Path(ckpt_dir)
    params = read_params(ckpt_dir)
    if any(ckpt_dir.glob("consolidated.*.pth")):  # params.json alone: sized all the same (before a download)
        open_shards(ckpt_dir)  # a missing, truncated or damaged shard fails here (memory-mapped: nothing is read)
    params["vocab_size"] = read_vocab_size(params, ckpt_dir, tokenizer_path)
    args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    dev = resolve_device(values["device"])
    run_dtype = SHORT_NAMES[resolve_dtype(values["dtype"], dev)]
    mp = values["model_parallel_size"] or 1  # None: one process
    n_params = count_parameters(args)
    kv_token = kv_bytes_per_token(args, DTYPES[run_dtype].itemsize, mp)
    kv_total = kv_token * max_seq_len * max_batch_size
    # forward() returns float32 logits for every prompt position: the largest activation of a full prefill.
    logits = max_batch_size * max_seq_len * args.vocab_size * 4
    weights = {name: int(n_params * b) for name, b in WEIGHT_BYTES.items()}
    weights["fp16"] = weights["bf16"]
    quantization = params.get("quantization")  # a quantized checkpoint: its own tensors' size is what loads
    real = checkpoint_bytes(ckpt_dir) if quantization else None
    need = (real if real is not None else weights[run_dtype] // mp) + kv_total
    free, source = available_memory(dev)
    return {
        "ckpt_dir": str(ckpt_dir),
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "ffn_hidden_dim": args.ffn_hidden_dim,
        "vocab_size": args.vocab_size,
        "parameters": n_params,
        "weight_bytes": weights,
        "quantization": quantization,
        "quantized_weight_bytes": real,
        "max_seq_len": max_seq_len,
        "max_batch_size": max_batch_size,
        "model_parallel_size": mp,
        "device": str(dev),
        "dtype": run_dtype,
        "kv_cache_bytes_per_token": kv_token,
        "kv_cache_bytes": kv_total,
        "prefill_logits_bytes": logits,
        "needed_bytes_per_rank": need,
        "available_bytes": free,
        "memory_source": source,
        "fits": None if free is None else need <= free,
        "fits_with_prefill_logits": None if free is None else need + logits <= free,
    }


def human(n: float | None) -> str:
    """Returns n bytes as a short human-readable string (KiB, MiB, GiB)."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_info(info: dict) -> str:
    """Returns the report `llama-gen info` prints."""
    mp = info["model_parallel_size"]
    per_rank = " per rank" if mp > 1 else ""
    lines = [
        f"checkpoint     {info['ckpt_dir']}",
        f"architecture   dim={info['dim']} n_layers={info['n_layers']} n_heads={info['n_heads']} "
        f"n_kv_heads={info['n_kv_heads']} head_dim={info['head_dim']} ffn={info['ffn_hidden_dim']} "
        f"vocab={info['vocab_size']}",
        f"parameters     {info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)",
        "weights        "
        + "  ".join(f"{k} {human(info['weight_bytes'][k])}" for k in WEIGHT_BYTES)
        + "  (int8/int4: weights only, no scales)",
        *(
            [f"quantized      {human(info['quantized_weight_bytes'])} as stored and loaded ({info['quantization']})"]
            if info["quantization"]
            else []
        ),
        f"KV cache       {human(info['kv_cache_bytes'])}{per_rank} for max_seq_len={info['max_seq_len']} x "
        f"max_batch_size={info['max_batch_size']} "
        f"({info['dtype']}; {human(info['kv_cache_bytes_per_token'])} per token)",
        f"prefill logits {human(info['prefill_logits_bytes'])} (float32, full batch x max_seq_len)",
        f"needed         {human(info['needed_bytes_per_rank'])}{per_rank} = "
        f"{'quantized' if info['quantization'] else info['dtype']} weights"
        f"{f' / {mp}' if mp > 1 else ''} + KV cache",
        f"available      {human(info['available_bytes'])} on {info['device']} ({info['memory_source']})",
    ]
    if info["fits"] is None:
        lines.append("fits           unknown (no memory figure for this device)")
    elif info["fits"]:
        share = 100 * info["needed_bytes_per_rank"] / info["available_bytes"]
        lines.append(
            f"fits           yes ({share:.0f}% of available)"
            + (
                ""
                if info["fits_with_prefill_logits"]
                else "; but not with the logits of a full-length prefill: lower --max_batch_size"
            )
        )
    else:
        lines.append(
            "fits           NO: lower --max_seq_len or --max_batch_size, use --dtype bf16, "
            "or split the model with --model_parallel_size"
        )
    return "\n".join(lines)


@friendly_errors
@takes(SIZING_FLAGS, [JSON_FLAG])
def main(values: dict) -> None:
    """Prints parameter count, weight memory per dtype, KV-cache size and whether weights + KV cache fit the
    device's free memory (CUDA: mem_get_info, CPU: MemAvailable); returns None.

    --json_output prints the same figures as one JSON object.
    """
    json_output = values.pop("json_output")
    info = model_info(**values)
    print(json.dumps(info, indent=2) if json_output else format_info(info))
