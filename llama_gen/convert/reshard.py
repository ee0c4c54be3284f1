"""Checkpoints saved for one number of model-parallel ranks, run or rewritten for another.

Shard XX holds exactly what model-parallel rank XX runs with. local_state merges and/or splits a checkpoint's N
shards into what each of M ranks needs (any N, M where the head counts divide; when M exceeds the number of KV
heads, each KV head is replicated so every rank holds whole heads); reshard writes such a copy to disk.
"""

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from llama_gen.checkpoint import SHARD_NAME, kv_replication, open_shards, read_params, validate_parallel
from llama_gen.model import ModelArgs

SKIPPED_FILES = ("checklist.chk",)  # Meta's md5 list of the old shards: stale after resharding


# Which dimension each weight is split along across model-parallel ranks (None: replicated). A column-parallel
# layer's bias (Qwen2's q/k/v biases) is split with its output features.
COLUMN_PARALLEL = tuple(
    "attention.wq.weight attention.wk.weight attention.wv.weight feed_forward.w1.weight feed_forward.w3.weight "
    "output.weight attention.wq.bias attention.wk.bias attention.wv.bias".split()
)
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
KV_WEIGHTS = ("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")


def split_dim(name: str) -> int | None:
    """Returns the dimension a weight is split along across model-parallel ranks, or None if replicated."""
    if name.endswith(COLUMN_PARALLEL):
        return 0
    if name.endswith(ROW_PARALLEL):
        return 1
    if name == "tok_embeddings.weight":
        return 1  # fairscale ParallelEmbedding splits the embedding dim, as Meta's Llama 2 shards do
    return None


def repeat_kv_heads(weight: torch.Tensor, n_kv_heads: int, repeats: int) -> torch.Tensor:
    """Returns a wk/wv weight (or bias) with each head's rows repeated ``repeats`` times (GQA groups stay aligned)."""
    head_dim = weight.shape[0] // n_kv_heads
    return weight.view(n_kv_heads, head_dim, -1).repeat_interleave(repeats, dim=0).reshape(-1, *weight.shape[1:])


def merge_kv(name: str, parts: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """Returns a full wk/wv weight (or bias) with one copy of each KV head, undoing the replication of shards saved
    for more ranks than there are KV heads."""
    weight = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    rows = args.kv_heads * args.head_dim
    if weight.shape[0] <= rows or weight.shape[0] % rows:
        return weight  # unreplicated (or a shape check_shapes will report)
    copies = weight.shape[0] // rows
    heads = weight.view(args.kv_heads, copies, args.head_dim, -1)
    if not torch.equal(heads, heads[:, :1].expand_as(heads)):
        raise ValueError(
            f"{name}: the shards hold {copies} copies of {args.kv_heads} KV heads but the copies differ: "
            f"n_kv_heads in params.json does not match the shards"
        )
    return heads[:, 0].reshape(rows, *weight.shape[1:])


def take_slice(name: str, parts: list[torch.Tensor], dim: int, index: int, count: int) -> torch.Tensor:
    """Returns slice ``index`` of ``count`` equal slices along dim of the concatenation of parts, touching only
    the parts it overlaps (a view when it lies within one part)."""
    total = sum(p.shape[dim] for p in parts)
    if total % count:
        raise ValueError(
            f"{name} has size {total} along dim {dim}, which cannot be split into {count} equal parts: "
            f"use a number of model-parallel ranks that divides it"
        )
    size = total // count
    start, stop, offset, pieces = index * size, (index + 1) * size, 0, []
    for part in parts:
        lo, hi = max(start, offset), min(stop, offset + part.shape[dim])
        if lo < hi:
            pieces.append(part.narrow(dim, lo - offset, hi - lo))
        offset += part.shape[dim]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def local_weight(name: str, parts: list[torch.Tensor], args: ModelArgs, mp_size: int, mp_rank: int) -> torch.Tensor:
    """Returns model-parallel rank mp_rank's piece of a weight given as N checkpoint shards (N, mp_size any).

    Only the shards it overlaps are read; the result may be a view of them.
    """
    dim = split_dim(name)
    if dim is None:
        return parts[0]
    if name.endswith(KV_WEIGHTS):
        repeats = kv_replication(args.kv_heads, mp_size)
        if repeats == 1 and sum(p.shape[0] for p in parts) == args.kv_heads * args.head_dim:
            return take_slice(name, parts, 0, mp_rank, mp_size).contiguous()  # no replication anywhere
        weight = merge_kv(name, parts, args)
        if repeats > 1:
            weight = repeat_kv_heads(weight, args.kv_heads, repeats)
        return take_slice(name, [weight], 0, mp_rank, mp_size).clone()
    if len(parts) > 1 and name == "tok_embeddings.weight" and parts[0].shape[1] == args.dim:
        parts = [torch.cat(parts, dim=0)]  # Llama 3 style shards split the vocabulary; we split the dim
    return take_slice(name, parts, dim, mp_rank, mp_size).contiguous()


def local_state(
    shards: list[dict[str, torch.Tensor]], args: ModelArgs, mp_size: int, mp_rank: int
) -> dict[str, torch.Tensor]:
    """Returns model-parallel rank mp_rank's weights (of mp_size) from a checkpoint's N shards (N any)."""
    return {name: local_weight(name, [s[name] for s in shards], args, mp_size, mp_rank) for name in shards[0]}


def shard_state(
    parts: list[dict[str, torch.Tensor]],
    args: ModelArgs,
    n_shards: int,
    rank: int,
    on_tensor: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Returns shard ``rank`` of ``n_shards`` as compact tensors ready for torch.save, from N source shards.

    on_tensor (e.g. a progress bar's update) is called after each tensor.
    """
    state = {}
    for name in parts[0]:
        state[name] = local_weight(name, [p[name] for p in parts], args, n_shards, rank).clone()
        if on_tensor is not None:
            on_tensor()
    return state


def reshard(ckpt_dir: str, out_dir: str, shards: int, overwrite: bool = False) -> Path:
    """Writes a copy of ckpt_dir split into ``shards`` consolidated.XX.pth files; returns out_dir.

    params.json, generation_config.json, tokenizer files and any other files are copied. Everything is written
    to a temporary directory next to out_dir, which is renamed into place only when complete.
    """
    src, out = Path(ckpt_dir), Path(out_dir)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"--shards must be a positive integer, got {shards!r}")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out_dir {out} is the source checkpoint: write the resharded copy somewhere else")
    if out.exists() and not overwrite:
        raise ValueError(f"--out_dir {out} already exists: remove it, choose another path or pass --overwrite")
    params = read_params(src)
    sources = open_shards(src)
    args = ModelArgs.from_params(params)
    if args.vocab_size <= 0 and "output.weight" in sources[0]:  # Meta's Llama 2 params.json says -1
        args.vocab_size = sum(s["output.weight"].shape[0] for s in sources)
    validate_parallel(args, shards)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier, killed run of this process id
    tmp.mkdir()
    try:
        with tqdm(
            total=shards * len(sources[0]), desc=f"resharding {src.name} into {shards}", unit="tensor", file=sys.stderr
        ) as bar:
            for rank in range(shards):
                state = shard_state(sources, args, shards, rank, on_tensor=lambda: bar.update())
                torch.save(state, tmp / f"consolidated.{rank:02d}.pth")
                del state
        for path in src.iterdir():
            if SHARD_NAME.fullmatch(path.name) or path.name in SKIPPED_FILES:
                continue
            if path.is_dir():
                shutil.copytree(path, tmp / path.name)
            else:
                shutil.copy2(path, tmp / path.name)
        if out.exists():  # only with overwrite
            old = out.parent / f".{out.name}.{os.getpid()}.old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
