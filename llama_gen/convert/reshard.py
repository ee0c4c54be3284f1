"""Rewrite a Meta-style checkpoint with a different number of model-parallel shards."""

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from llama_gen.checkpoint import SHARD_NAME, local_weight, open_shards, read_params, validate_parallel
from llama_gen.model import ModelArgs

SKIPPED_FILES = ("checklist.chk",)  # Meta's md5 list of the old shards: stale after resharding


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
