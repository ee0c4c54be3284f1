"""The one place that decides between plain and fairscale model-parallel layers.

With a single model-parallel rank (the common case, and any run without ``torchrun``) the model is built
from plain ``nn.Linear``/``nn.Embedding`` and needs no process group. With several ranks it uses
fairscale's column/row-parallel layers, exactly as Meta's reference does.
"""

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def model_parallel_world_size() -> int:
    """Returns the number of model-parallel ranks (1 when fairscale's model parallel is not initialized)."""
    from fairscale.nn.model_parallel import initialize as fs_init

    if not (dist.is_available() and dist.is_initialized()) or not fs_init.model_parallel_is_initialized():
        return 1
    return fs_init.get_model_parallel_world_size()


def model_parallel_rank() -> int:
    """Returns this process's rank within its model-parallel group (0 without model parallel)."""
    from fairscale.nn.model_parallel import initialize as fs_init

    if model_parallel_world_size() == 1:
        return 0
    return fs_init.get_model_parallel_rank()


def backend_for(device: torch.device) -> str:
    """Returns the torch.distributed backend for a device: nccl on CUDA, gloo elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(model_parallel_size: Optional[int], device: torch.device) -> int:
    """Starts the process group (when running under torchrun) and fairscale model parallel.

    Returns the model-parallel size in use. A single process without ``torchrun`` needs no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if model_parallel_size is None:
        model_parallel_size = world_size
    if model_parallel_size < 1 or world_size % model_parallel_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} must divide the number of processes ({world_size}); "
            f"launch with `torchrun --nproc_per_node {model_parallel_size}` or pass a divisor of {world_size}"
        )
    if world_size == 1:
        return 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device), timeout=timedelta(minutes=30))
    from fairscale.nn.model_parallel import initialize as fs_init

    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(model_parallel_size)
    return model_parallel_size


def _keep(weight: torch.Tensor) -> torch.Tensor:
    """fairscale init hook that leaves the weight alone: real values come from the checkpoint."""
    return weight


def column_linear(in_features: int, out_features: int, gather_output: bool = False) -> nn.Module:
    """Returns a bias-free linear layer whose output features are split across model-parallel ranks."""
    if model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    return ColumnParallelLinear(in_features, out_features, bias=False, gather_output=gather_output, init_method=_keep)


def row_linear(in_features: int, out_features: int) -> nn.Module:
    """Returns a bias-free linear layer whose input features are split across model-parallel ranks."""
    if model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    from fairscale.nn.model_parallel.layers import RowParallelLinear

    return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True, init_method=_keep)


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
    """Returns a token embedding; with model parallel its embedding dim is split as in Meta's Llama 2 shards."""
    if model_parallel_world_size() == 1:
        return nn.Embedding(num_embeddings, embedding_dim)
    from fairscale.nn.model_parallel.layers import ParallelEmbedding

    return ParallelEmbedding(num_embeddings, embedding_dim, init_method=_keep)
