"""Keeping one copy of the weights in memory while they are converted, fused, packed or quantized at load time."""

import ctypes
from collections.abc import Callable

import torch

from llama_gen.checkpoint import LIBC, release_freed_memory, release_pages

_MADV_HUGEPAGE = 14  # back this anonymous range with transparent huge pages where the kernel allows it
HUGE_PAGE = 2 << 20
TENSOR_ALIGNMENT = 64  # bytes: a cache line, and what vector loads and oneDNN prefer


def huge_page_tensors(specs: list[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor]:
    """Returns uninitialized CPU tensors of these shapes and dtypes, laid out one after another in one
    allocation whose 2 MiB pages are advised as transparent huge pages (``madvise(MADV_HUGEPAGE)``).

    Decoding streams every weight (and at long contexts the KV cache) once per step; on 4 KiB pages that is a
    TLB miss every 4 KiB, and the hardware prefetchers stop at each page boundary. With its weights on huge
    pages the default model's decode step is ~15-20 % shorter at batch 1 (float32 and bf16) and ~4 % at
    batch 8 (float32); its KV caches gained nothing measurable (benchmarks/RESULTS.md). Where
    the kernel gives no huge pages (THP "never", or no free 2 MiB blocks) the tensors are ordinary memory.
    Nothing is touched here, so no memory is committed until the tensors are written.
    """
    spans, total = [], 0  # (offset, bytes) of each tensor
    for shape, dtype in specs:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        spans.append((total, nbytes))
        total += -(-nbytes // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
    raw = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    arena = raw[skip : skip + total]
    whole_pages = total // HUGE_PAGE * HUGE_PAGE  # a partial last page stays small: no memory beyond `total`
    if LIBC is not None and whole_pages:
        LIBC.madvise(ctypes.c_void_p(arena.data_ptr()), ctypes.c_size_t(whole_pages), _MADV_HUGEPAGE)
    return [
        arena[offset : offset + nbytes].view(dtype).view(shape)
        for (offset, nbytes), (shape, dtype) in zip(spans, specs)
    ]


def move_to_huge_pages(model: torch.nn.Module) -> None:
    """Moves a CPU model's parameters and buffers, in place, into one huge_page_tensors allocation.

    Embedding tables stay where they are: a step reads only its tokens' rows, and a memory-mapped table keeps
    only those resident (a tied output layer reads it whole, so a table shared with one is moved). One tensor
    at a time, each source freed (or its memory-mapped pages dropped) before the next is copied, so the
    weights are never held twice. Shared tensors stay shared.
    """
    moves: dict[int, tuple[torch.Tensor, list[tuple[torch.nn.Module, str]]]] = {}  # id -> tensor, its holders
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device.type == "cpu":
                    moves.setdefault(id(tensor), (tensor, []))[1].append((module, name))
    if not moves:
        return
    targets = huge_page_tensors([(tensor.shape, tensor.dtype) for tensor, _ in moves.values()])
    for key, target in zip(list(moves), targets):
        tensor, holders = moves.pop(key)  # the last reference here, so the source is freed below
        old = tensor.detach()
        copy_releasing(target, old)
        if isinstance(tensor, torch.nn.Parameter):
            tensor.data = target  # every module holding this parameter sees the move
        else:
            for module, name in holders:
                module._buffers[name] = target
        del tensor, old
        release_freed_memory()


def copy_releasing(target: torch.Tensor, source: torch.Tensor, chunk_bytes: int = 16 << 20) -> None:
    """Copies a contiguous CPU tensor into ``target`` in chunks, dropping each source chunk's memory-mapped pages
    once copied (release_pages), so a large memory-mapped tensor is never resident twice."""
    if not source.is_contiguous():
        target.copy_(source)
        release_pages(source)
        return
    flat_target, flat_source = target.view(-1), source.view(-1)
    step = max(1, chunk_bytes // source.element_size())
    for start in range(0, flat_source.numel(), step):
        flat_target[start : start + step].copy_(flat_source[start : start + step])
        release_pages(flat_source[start : start + step])


def replace_modules(
    model: torch.nn.Module,
    select: Callable[[torch.nn.Module], bool],
    replace: Callable[[torch.nn.Module], torch.nn.Module],
) -> None:
    """Replaces, in place and one at a time, every submodule ``m`` with ``select(m)`` by ``replace(m)``.

    Each old module's memory is handed back before the next replacement is built (its memory-mapped pages
    dropped, its freed heap returned), so converting a model never holds two copies of its weights. Tensors
    the replacement shares with the old module keep their pages.
    """
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children() if select(child)]
    for parent, name in targets:
        old = getattr(parent, name)
        new = replace(old)
        setattr(parent, name, new)
        kept = {t.data_ptr() for t in [*new.parameters(), *new.buffers()]}
        for tensor in [*old.parameters(), *old.buffers()]:
            if tensor.data_ptr() not in kept:
                release_pages(tensor)
        del old
        release_freed_memory()
