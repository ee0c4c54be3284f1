"""Devices and dtypes: what runs where by default, dtype names, and the one CPU fact the core warns about."""

import functools
import warnings

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES |= {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def default_device() -> torch.device:
    """Returns cuda if available, then mps, else cpu."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Returns bf16 on GPUs that support it (fp16 on other GPUs and mps), fp32 on CPU."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float16 if device.type in ("cuda", "mps") else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Returns a torch device from a name, a device, or None (default_device)."""
    return torch.device(device) if device is not None else default_device()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Returns a torch dtype from a name, a dtype, or None (the device's default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return default_dtype(device) if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@functools.cache
def has_native_bf16_matmul() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU (AVX512 or AVX-NE-CONVERT; it can pack them too)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_slow(device: torch.device, dtype: torch.dtype) -> None:
    """Warns when bf16 on this CPU falls back to a slow reference kernel (more than one row at a time)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not has_native_bf16_matmul():
        slow = "this CPU has no native bf16 matmuls (it lacks AVX512): bf16 runs several times slower than float32"
        warnings.warn(f"{slow} beyond one row (prompts, batches); dtype='float32' is faster here", stacklevel=3)
