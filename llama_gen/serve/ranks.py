"""The engine's model calls, and how they reach every rank of a model split over several processes.

With model parallel every rank holds a slice of each layer, so every rank must make the same model calls, with
the same inputs, in the same order. The first rank of each model-parallel group schedules: it runs the Engine,
and before each model call it broadcasts the call (a small header, then its token and position tensors) to the
other ranks of its group, which run ``follow`` instead: they make the same call and drop the logits (every rank
gets the whole logits, but only the scheduling rank samples; the tokens it sampled reach the others as the next
call's inputs). Without model parallel nothing is sent.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

from llama_gen import parallel
from llama_gen.fast import FastForward
from llama_gen.generation import Llama

PREFILL, DECODE, IDLE, STOP = range(4)
HEARTBEAT_S = 60.0  # an idle scheduler still broadcasts this often, well within the collectives' timeout


def model_parallel_group() -> tuple[object, int] | None:
    """Returns (this rank's model-parallel group, the global rank of its first member), or None without model
    parallel."""
    if parallel.model_parallel_world_size() == 1:
        return None
    from fairscale.nn.model_parallel import initialize as fs_init

    return fs_init.get_model_parallel_group(), fs_init.get_model_parallel_src_rank()


def schedules() -> bool:
    """True on the rank that runs the Engine: every rank without model parallel, else each group's first."""
    group = model_parallel_group()
    return group is None or dist.get_rank() == group[1]


def decode_forward(llama: Llama) -> FastForward:
    """Returns the Llama's decode step (its compiled FastForward, else the same step run eagerly)."""
    return llama.forward if isinstance(llama.forward, FastForward) else FastForward(llama.model, compile=False)


class ModelCalls:
    """The two model calls an engine makes: a chunk of one prompt into one cache row, and one decode step for
    every row. Under model parallel, on the scheduling rank, each is broadcast to the group's other ranks first."""

    def __init__(self, llama: Llama):
        self.model, self.step, self.device = llama.model, decode_forward(llama), llama.device
        self.group = model_parallel_group()
        if self.group is not None and dist.get_rank() != self.group[1]:
            raise RuntimeError("only the first rank of a model-parallel group runs the engine; the others follow()")

    @property
    def broadcasting(self) -> bool:
        return self.group is not None

    def prefill(self, tokens: torch.Tensor, start_pos: int, row: int) -> torch.Tensor:
        """Runs prompt tokens ``[1, n]`` into cache row ``row`` from start_pos; returns the last logits."""
        self._send(PREFILL, start_pos, row, tokens.shape[1], tokens)
        return self.model.forward(tokens, start_pos, last_only=True, first_row=row)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
        """Runs one decode step: tokens ``[rows, 1]``, each row at its own position; returns logits."""
        self._send(DECODE, window, 0, tokens.shape[0], tokens, positions)
        return self.step.decode_rows(tokens, positions, window)

    def idle(self) -> None:
        """Tells the other ranks the scheduler is still there (nothing to run)."""
        self._send(IDLE)

    def stop(self) -> None:
        """Releases the other ranks from ``follow``."""
        self._send(STOP)

    def _send(self, op: int, a: int = 0, b: int = 0, n: int = 0, *tensors: torch.Tensor) -> None:
        if self.group is None:
            return
        group, src = self.group
        dist.broadcast(torch.tensor([op, a, b, n], device=self.device), src, group=group)
        for tensor in tensors:
            dist.broadcast(tensor.reshape(-1).contiguous(), src, group=group)


@contextlib.contextmanager
def scheduler_decides_when_to_stop() -> Iterator[None]:
    """Ignores SIGINT and SIGTERM meanwhile (in the main thread): torchrun passes a stop signal to every rank, and a
    follower that left at once would leave the scheduling rank unable to finish what is in flight; the follower
    leaves when the scheduler's engine closes (or its connection drops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def follow(llama: Llama) -> None:
    """On a model-parallel rank that does not schedule: makes the scheduling rank's model calls until its engine
    closes; returns None. (Without model parallel, or on the scheduling rank, returns at once.)"""
    group_info = model_parallel_group()
    if group_info is None or schedules():
        return
    group, src = group_info
    model, step, device = llama.model, decode_forward(llama), llama.device

    def receive(n: int) -> torch.Tensor:
        tensor = torch.empty(n, dtype=torch.long, device=device)
        dist.broadcast(tensor, src, group=group)
        return tensor

    with llama.exclusive(wait=False), torch.inference_mode(), scheduler_decides_when_to_stop():
        while True:
            op, a, b, n = receive(4).tolist()
            if op == STOP:
                return
            try:
                if op == PREFILL:
                    model.forward(receive(n)[None], a, last_only=True, first_row=b)
                elif op == DECODE:
                    tokens, positions = receive(n)[:, None], receive(n)
                    step.decode_rows(tokens, positions, a)
            except Exception:  # noqa: BLE001, S110 - the scheduler failed the same call and fails its requests
                pass
