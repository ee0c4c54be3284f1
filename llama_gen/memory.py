"""Keeping one copy of the weights in memory while they are converted, fused, packed or quantized at load time."""

import ctypes
import functools
import mmap
from typing import Callable, Optional

import torch

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (file-backed pages are simply dropped)


@functools.cache
def _libc() -> Optional[ctypes.CDLL]:
    """The C library of this process, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def release_pages(tensor: torch.Tensor) -> None:
    """Asks the kernel to drop the resident pages under a CPU tensor we are done with.

    Weights loaded with ``torch.load(mmap=True)`` stay resident (and count in RSS) once read, until the whole
    file is unmapped. When a weight is replaced by a fused or quantized copy, dropping its pages keeps the
    peak at one copy of the weights. Data is never changed: anonymous pages without swap are left in place.
    """
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def release_freed_memory() -> None:
    """Returns memory freed by the C allocator to the OS (glibc keeps freed heap pages resident otherwise)."""
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def convert_weights(state: dict[str, torch.Tensor], dtype: torch.dtype,
                    device: torch.device) -> dict[str, torch.Tensor]:
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


def replace_modules(model: torch.nn.Module, select: Callable[[torch.nn.Module], bool],
                    replace: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Replaces, in place and one at a time, every submodule ``m`` with ``select(m)`` by ``replace(m)``.

    Each old module's memory is handed back before the next replacement is built (its memory-mapped pages
    dropped, its freed heap returned), so converting a model never holds two copies of its weights. Tensors
    the replacement shares with the old module keep their pages.
    """
    targets = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if select(child)]
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
