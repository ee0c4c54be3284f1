"""The one place that decides between plain and fairscale model-parallel layers.

With a single model-parallel rank (the common case, and any run without ``torchrun``) the model is built
from plain ``nn.Linear``/``nn.Embedding`` and needs no process group. With several ranks it uses
fairscale's column/row-parallel layers, exactly as Meta's reference does. Processes beyond the
model-parallel size form data-parallel groups (fairscale's ``initialize_model_parallel``).
"""

import atexit
import contextlib
import gc
import io
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def _group_info(query: str, default: int) -> int:
    """Returns fairscale's ``query()`` (e.g. "get_model_parallel_rank"), or default while model parallel is off."""
    from fairscale.nn.model_parallel import initialize as fs_init  # imported when used: `llama-gen info` starts fast

    on = dist.is_available() and dist.is_initialized() and fs_init.model_parallel_is_initialized()
    return getattr(fs_init, query)() if on else default


def model_parallel_world_size() -> int:
    """Returns the number of model-parallel ranks (1 when fairscale's model parallel is not initialized)."""
    return _group_info("get_model_parallel_world_size", 1)


def model_parallel_rank() -> int:
    """Returns this process's rank within its model-parallel group (0 without model parallel)."""
    return _group_info("get_model_parallel_rank", 0)


def data_parallel_world_size() -> int:
    """Returns the number of model replicas (WORLD_SIZE / model-parallel size; 1 without distributed)."""
    return _group_info("get_data_parallel_world_size", 1)


def data_parallel_rank() -> int:
    """Returns which model replica this process belongs to (0 without distributed)."""
    return _group_info("get_data_parallel_rank", 0)


def backend_for(device: torch.device) -> str:
    """Returns the torch.distributed backend for a device: nccl on CUDA, gloo elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(model_parallel_size: int | None, device: torch.device) -> int:
    """Starts the process group (when running under torchrun) and fairscale model/data parallel groups.

    Returns the model-parallel size in use (default: all processes). A single process without
    ``torchrun`` needs no process group; with WORLD_SIZE=W and model_parallel_size=M < W there are
    W / M data-parallel replicas, each split over M ranks.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if model_parallel_size is None:
        model_parallel_size = world_size
    if not isinstance(model_parallel_size, int) or model_parallel_size < 1 or world_size % model_parallel_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size!r} must be a positive divisor of the number of processes "
            f"({world_size}); launch with `torchrun --nproc_per_node {model_parallel_size}` or pass a divisor "
            f"of {world_size}"
        )
    if world_size == 1:
        return 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device), timeout=timedelta(minutes=30))
        atexit.register(release_groups)
    from fairscale.nn.model_parallel import initialize as fs_init

    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on rank 0
            fs_init.initialize_model_parallel(model_parallel_size)
    elif fs_init.get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(
            f"model parallel is already initialized with {fs_init.get_model_parallel_world_size()} ranks, "
            f"not {model_parallel_size}: use the same model_parallel_size for every model in one process"
        )
    return model_parallel_size


def shutdown_distributed() -> None:
    """Waits for every rank, then ends fairscale's groups and the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    release_groups()


def release_groups() -> None:
    """Ends fairscale's groups and the process group now, without waiting for the other ranks.

    fairscale keeps its model/data-parallel groups in module globals. Left for interpreter exit, their gloo
    threads were torn down out of order and a rank occasionally died with "terminate called without an active
    exception" (SIGABRT) after finishing its work (~1 run in 20 on a loaded 2-core machine). Registered with
    atexit by init_distributed, so programs using the Python API under torchrun get it too.
    """
    from fairscale.nn.model_parallel import initialize as fs_init

    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the dropped groups go now, while the interpreter is fully alive


@contextlib.contextmanager
def _no_master_weights() -> Iterator[None]:
    """Skips fairscale's ``_initialize_affine_weight``, which builds and splits a full (out, in) tensor."""
    from fairscale.nn.model_parallel import layers

    original = layers._initialize_affine_weight
    layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        layers._initialize_affine_weight = original


def _fairscale(cls: type, *args, **kwargs) -> nn.Module:
    """Returns a fairscale layer with uninitialized local weights on the default device (meta inside
    ``with torch.device("meta")``), never allocating the full master weight."""
    with _no_master_weights():
        module = cls(*args, init_method=lambda weight: weight, **kwargs)  # the checkpoint brings the values
    return module.to_empty(device=torch.get_default_device())


def column_linear(in_features: int, out_features: int, gather_output: bool = False, bias: bool = False) -> nn.Module:
    """Returns a linear layer (bias if asked) whose output features (and bias) are split across model-parallel ranks."""
    if model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    return _fairscale(ColumnParallelLinear, in_features, out_features, bias=bias, gather_output=gather_output)


def row_linear(in_features: int, out_features: int) -> nn.Module:
    """Returns a bias-free linear layer whose input features are split across model-parallel ranks."""
    if model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    from fairscale.nn.model_parallel.layers import RowParallelLinear

    return _fairscale(RowParallelLinear, in_features, out_features, bias=False, input_is_parallel=True)


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
    """Returns a token embedding; with model parallel its embedding dim is split as in Meta's Llama 2 shards."""
    if model_parallel_world_size() == 1:
        return nn.Embedding(num_embeddings, embedding_dim)
    from fairscale.nn.model_parallel.layers import ParallelEmbedding

    return _fairscale(ParallelEmbedding, num_embeddings, embedding_dim)
