"""Meta-style checkpoint directories: ``params.json`` plus ``consolidated.XX.pth`` model-parallel shards.

Shards are merged and re-split on load, so a checkpoint saved with N shards runs on M model-parallel ranks
for any N, M where the head counts divide.
"""

import json
import re
from pathlib import Path
from typing import Optional

import torch

from llama_gen.model import ModelArgs

# Which dimension each weight is split along across model-parallel ranks (None: replicated).
COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
IGNORED_KEYS = ("rope.freqs",)  # Meta's Llama 2 shards carry a rotary table we recompute


def split_dim(name: str) -> Optional[int]:
    """Returns the dimension a weight is split along across model-parallel ranks, or None if replicated."""
    if name.endswith(COLUMN_PARALLEL):
        return 0
    if name.endswith(ROW_PARALLEL):
        return 1
    if name == "tok_embeddings.weight":
        return 1  # fairscale ParallelEmbedding splits the embedding dim, as Meta's Llama 2 shards do
    return None


def read_params(ckpt_dir: Path) -> dict:
    """Returns the parsed ``params.json`` of a checkpoint directory."""
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a checkpoint directory needs params.json and consolidated.XX.pth shards "
            f"(convert a GGUF file or Hugging Face directory with `python scripts/convert.py SRC OUT_DIR`)"
        )
    with open(path) as f:
        return json.load(f)


def find_shards(ckpt_dir: Path) -> list[Path]:
    """Returns the ``consolidated.XX.pth`` shards in rank order, checking none is missing."""
    shards = sorted(Path(ckpt_dir).glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"no consolidated.XX.pth checkpoint shards in {ckpt_dir}")
    numbers = [int(m.group(1)) for s in shards if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", s.name))]
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        names = ", ".join(f"consolidated.{n:02d}.pth" for n in missing)
        raise FileNotFoundError(
            f"{ckpt_dir} has {len(shards)} shards but is missing {names}: copy the complete checkpoint"
        )
    return shards


def kv_replication(n_kv_heads: int, mp_size: int) -> int:
    """Returns how many times each KV head is repeated so that every one of mp_size ranks holds whole heads."""
    if n_kv_heads % mp_size == 0:
        return 1
    if mp_size % n_kv_heads == 0:
        return mp_size // n_kv_heads
    raise ValueError(
        f"{n_kv_heads} KV heads cannot be spread over {mp_size} model-parallel ranks: "
        f"use a number of ranks that divides or is a multiple of {n_kv_heads}"
    )


def validate_parallel(args: ModelArgs, mp_size: int) -> None:
    """Raises ValueError if the model cannot be split over mp_size ranks."""
    for name, value in (("n_heads", args.n_heads), ("dim", args.dim), ("ffn hidden size", args.ffn_hidden_dim)):
        if value % mp_size:
            raise ValueError(f"{name}={value} is not divisible by model_parallel_size={mp_size}")
    kv_replication(args.kv_heads, mp_size)


def repeat_kv_heads(weight: torch.Tensor, n_kv_heads: int, repeats: int) -> torch.Tensor:
    """Returns a wk/wv weight with each head's rows repeated ``repeats`` times (GQA groups stay aligned)."""
    head_dim = weight.shape[0] // n_kv_heads
    return weight.view(n_kv_heads, head_dim, -1).repeat_interleave(repeats, dim=0).reshape(-1, weight.shape[1])


def merge_shards(name: str, parts: list[torch.Tensor], full_dim: int) -> torch.Tensor:
    """Returns one weight assembled from its per-shard pieces."""
    if len(parts) == 1:
        return parts[0]
    dim = split_dim(name)
    if dim is None:
        return parts[0]
    if name == "tok_embeddings.weight" and parts[0].shape[1] == full_dim:
        dim = 0  # Llama 3 style VocabParallelEmbedding shards split the vocabulary instead
    return torch.cat(parts, dim=dim)


def load_state_dict(ckpt_dir: Path, args: ModelArgs, mp_size: int = 1, mp_rank: int = 0) -> dict[str, torch.Tensor]:
    """Returns this rank's weights, merging/splitting the checkpoint's shards as needed (memory-mapped reads)."""
    shard_paths = find_shards(ckpt_dir)
    shards = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in shard_paths]
    repeats = kv_replication(args.kv_heads, mp_size)
    state = {}
    for name in shards[0]:
        if name in IGNORED_KEYS:
            continue
        missing_in = [p.name for p, s in zip(shard_paths, shards) if name not in s]
        if missing_in:
            raise ValueError(f"{name} is in {shard_paths[0].name} but missing from {', '.join(missing_in)}")
        same_layout = len(shards) == mp_size and repeats == 1
        if same_layout and (mp_size == 1 or name != "tok_embeddings.weight"):
            state[name] = shards[mp_rank][name]  # shard layout already matches: no copy
            continue
        weight = merge_shards(name, [s[name] for s in shards], args.dim)
        if repeats > 1 and name.endswith(("attention.wk.weight", "attention.wv.weight")):
            weight = repeat_kv_heads(weight, args.kv_heads, repeats)
        dim = split_dim(name)
        if dim is not None and mp_size > 1:
            weight = weight.chunk(mp_size, dim=dim)[mp_rank]
        state[name] = weight.contiguous()
    return state


def check_shapes(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], ckpt_dir: Path, args: ModelArgs) -> None:
    """Raises ValueError naming the file and the numbers when weights don't fit the model built from params.json."""
    where = f"{Path(ckpt_dir) / 'consolidated.*.pth'} vs {Path(ckpt_dir) / 'params.json'}"
    problems = []
    for name in sorted(set(expected) - set(state)):
        problems.append(f"missing {name} (expected shape {list(expected[name])})")
    for name in sorted(set(state) - set(expected)):
        problems.append(f"unexpected {name} of shape {list(state[name].shape)}")
    for name in sorted(set(state) & set(expected)):
        if state[name].shape != expected[name]:
            problems.append(f"{name} has shape {list(state[name].shape)}, the model expects {list(expected[name])}")
    if problems:
        summary = (f"dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
                   f"n_kv_heads={args.kv_heads}, vocab_size={args.vocab_size}, ffn hidden={args.ffn_hidden_dim}")
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"checkpoint does not match its params ({where}; {summary}):\n  {shown}")


def save_shards(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: Path, n_shards: int, params: dict) -> None:
    """Writes ``params.json`` and ``n_shards`` ``consolidated.XX.pth`` files split as the reference shards them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    validate_parallel(args, n_shards)
    for rank in range(n_shards):
        shard = {}
        for name, weight in state.items():
            dim = split_dim(name)
            shard[name] = weight.chunk(n_shards, dim=dim)[rank].clone() if dim is not None and n_shards > 1 else weight
        torch.save(shard, out_dir / f"consolidated.{rank:02d}.pth")
    with open(out_dir / "params.json", "w") as f:
        json.dump(params, f, indent=2)
