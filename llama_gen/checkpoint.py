"""Meta-style checkpoint directories: ``params.json`` plus ``consolidated.XX.pth`` model-parallel shards.

Shard XX holds exactly what model-parallel rank XX runs with (checkpoints saved for another number of ranks are
merged and/or split on load by llama_gen.convert.reshard). Weights are memory-mapped and converted one tensor at a
time, each source's pages dropped as it goes, so loading never holds two copies of the weights.
"""

import contextlib
import ctypes
import mmap
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from llama_gen import files, parallel
from llama_gen.model import ModelArgs, Transformer
from llama_gen.tokenizer import Tokenizer

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (file-backed pages are simply dropped)

IGNORED_KEYS = ("rope.freqs",)  # Meta's Llama 2 shards carry a rotary table we recompute
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


def read_params(ckpt_dir: Path) -> dict:
    """Returns the parsed ``params.json`` of a checkpoint directory."""
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a checkpoint directory needs params.json and consolidated.XX.pth shards "
            f"(convert a GGUF file or Hugging Face directory with `python scripts/convert.py SRC OUT_DIR`)"
        )
    return files.read_json(path)


def find_shards(ckpt_dir: Path) -> list[Path]:
    """Returns the ``consolidated.XX.pth`` shards in rank order, checking none is missing."""
    shards = [p for p in Path(ckpt_dir).glob("consolidated.*.pth") if SHARD_NAME.fullmatch(p.name)]
    if not shards:
        raise FileNotFoundError(f"no consolidated.XX.pth checkpoint shards in {ckpt_dir}")
    shards.sort(key=lambda p: int(SHARD_NAME.fullmatch(p.name).group(1)))
    numbers = [int(SHARD_NAME.fullmatch(p.name).group(1)) for p in shards]
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        names = ", ".join(f"consolidated.{n:02d}.pth" for n in missing)
        raise FileNotFoundError(
            f"{ckpt_dir} has {len(shards)} shards but is missing {names}: copy the complete checkpoint"
        )
    return shards


def open_shards(ckpt_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Returns every shard's tensors (memory-mapped, ignored keys dropped), checking they name the same weights."""
    paths = find_shards(ckpt_dir)
    shards = []
    for path in paths:
        shards.append({k: v for k, v in files.load_shard(path).items() if k not in IGNORED_KEYS})
    for path, state in zip(paths[1:], shards[1:]):
        missing, extra = set(shards[0]) - set(state), set(state) - set(shards[0])
        if missing or extra:
            raise ValueError(
                f"{path} does not hold the same weights as {paths[0].name} (missing {sorted(missing)[:3]}, "
                f"extra {sorted(extra)[:3]}): the shards come from different checkpoints; copy a complete one"
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
    if not isinstance(mp_size, int) or mp_size < 1:
        raise ValueError(f"the number of model-parallel ranks/shards must be a positive integer, got {mp_size!r}")
    sizes = [("n_heads", args.n_heads), ("dim", args.dim), ("ffn hidden size", args.ffn_hidden_dim)]
    if args.vocab_size > 0:
        sizes.append(("vocab_size", args.vocab_size))
    for name, value in sizes:
        if value % mp_size:
            raise ValueError(
                f"{name}={value} is not divisible by {mp_size} model-parallel ranks: use a divisor of {value}"
            )
    kv_replication(args.kv_heads, mp_size)


def load_state_dict(ckpt_dir: Path, args: ModelArgs, mp_size: int = 1, mp_rank: int = 0) -> dict[str, torch.Tensor]:
    """Returns this rank's weights, memory-mapped. One shard on one rank is taken as it is; any other shard count
    is merged and/or split for mp_size ranks by llama_gen.convert.reshard. ``args.n_kv_heads`` must be the
    checkpoint's own (before any replication for mp_size)."""
    if not 0 <= mp_rank < mp_size:
        raise ValueError(f"mp_rank={mp_rank} is outside the {mp_size} model-parallel ranks")
    shards = open_shards(ckpt_dir)
    if len(shards) == mp_size == 1:
        return shards[0]
    from llama_gen.convert.reshard import local_state  # the lazy hook: a checkpoint saved for other rank counts

    return local_state(shards, args, mp_size, mp_rank)


def check_shapes(
    expected: dict[str, torch.Size], state: dict[str, torch.Tensor], ckpt_dir: Path, args: ModelArgs
) -> None:
    """Raises ValueError naming the file and the numbers when weights don't fit the model built from params.json."""
    where = f"{Path(ckpt_dir) / 'consolidated.*.pth'} vs {Path(ckpt_dir) / 'params.json'}"
    problems = [f"missing {n} (expected shape {list(expected[n])})" for n in sorted(set(expected) - set(state))]
    problems += [f"unexpected {n} of shape {list(state[n].shape)}" for n in sorted(set(state) - set(expected))]
    for name in sorted(set(state) & set(expected)):
        if state[name].shape != expected[name]:
            problems.append(f"{name} has shape {list(state[name].shape)}, the model expects {list(expected[name])}")
    if problems:
        summary = (
            f"dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
            f"n_kv_heads={args.kv_heads}, vocab_size={args.vocab_size}, ffn hidden={args.ffn_hidden_dim}"
        )
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"checkpoint does not match its params ({where}; {summary}):\n  {shown}")


try:  # for madvise and malloc_trim (release_pages, release_freed_memory); None where there is no C library
    LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    LIBC = None


def release_pages(tensor: torch.Tensor) -> None:
    """Asks the kernel to drop the resident pages under a CPU tensor we are done with.

    Weights loaded with ``torch.load(mmap=True)`` stay resident (and count in RSS) once read, until the whole
    file is unmapped. When a weight is replaced by a fused or quantized copy, dropping its pages keeps the
    peak at one copy of the weights. Data is never changed: anonymous pages without swap are left in place.
    """
    if LIBC is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def release_freed_memory() -> None:
    """Returns memory freed by the C allocator to the OS (glibc keeps freed heap pages resident otherwise)."""
    trim = getattr(LIBC, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def convert_weights(
    state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Returns the weights in ``dtype`` on ``device``, converting one tensor at a time (``state`` is emptied).

    Each source tensor's memory-mapped pages are dropped once it is converted, so the checkpoint's pages and the
    converted weights never all sit in memory together (a bf16 copy of float32 weights would otherwise triple
    the resident size).
    """
    converted = {}
    for name in list(state):
        source = state.pop(name)
        converted[name] = source.to(device=device, dtype=dtype)
        if converted[name].data_ptr() != source.data_ptr():
            release_pages(source)
        del source
    release_freed_memory()
    return converted


def read_generation_config(ckpt_dir: Path) -> dict:
    """Returns the checkpoint's ``generation_config.json`` (empty if absent)."""
    path = Path(ckpt_dir) / "generation_config.json"
    return files.read_json(path) if path.is_file() else {}


def load_model(
    ckpt_dir: Path, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype, **sizes: int
) -> Transformer:
    """Returns the model of a checkpoint directory, this rank's shard of it, on device in dtype (eval mode);
    ``sizes``: max_seq_len and max_batch_size."""
    mp_size = parallel.model_parallel_world_size()
    params = read_params(ckpt_dir)
    if params.get("vocab_size", -1) == -1:
        params["vocab_size"] = tokenizer.n_words
    if tokenizer.n_words != params["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.n_words} tokens but {ckpt_dir / 'params.json'} says "
            f"vocab_size={params['vocab_size']}: use the tokenizer the model was trained with"
        )
    args = ModelArgs.from_params(params, **sizes)
    validate_parallel(args, mp_size)
    state = load_state_dict(ckpt_dir, args, mp_size, parallel.model_parallel_rank())
    args.n_kv_heads = args.kv_heads * kv_replication(args.kv_heads, mp_size)
    model = build_model(args)
    if "quantization" in params:  # the lazy hook: a quantized checkpoint's layers keep their tensors as they are
        from llama_gen.fast.qcheckpoint import load_quantized

        load_quantized(model, state, params["quantization"], device, dtype, Path(ckpt_dir))
    check_shapes({k: v.shape for k, v in model.state_dict().items()}, state, ckpt_dir, args)
    model.load_state_dict(convert_weights(state, dtype, device), strict=True, assign=True)
    return model.to(device).eval()  # moves the buffers that are not in the checkpoint


def build_model(args: ModelArgs) -> Transformer:
    """Returns the model on the meta device (no weights allocated, fairscale layers included under model
    parallel); load real weights with ``load_state_dict(..., assign=True)``."""
    with torch.device("meta"), _no_random_init():
        return Transformer(args)


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Builds nn.Linear and nn.Embedding without their random init. The checkpoint replaces those weights, and
    on the meta device the init functions import torch._dynamo (74 MiB resident) for nothing."""
    saved = {cls: cls.reset_parameters for cls in (torch.nn.Linear, torch.nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset
