"""Serving (optional): continuous batching for many concurrent requests on one model, from any thread or asyncio.

``Engine`` owns a Llama's model and its KV cache rows; ``Engine.submit`` (or ``submit_text`` / ``submit_chat``)
returns a ``RequestHandle`` to iterate for deltas or wait on for a ``Completion``. Load the Llama with
``on_passing_thread(Llama.build, ...)`` (llama_gen.serve.threads says why: the engine's steps run ~35 % faster).
"""

from llama_gen.serve.engine import Engine, EngineClosed, QueueFull
from llama_gen.serve.request import Completion, Delta, RequestCancelled, RequestHandle
from llama_gen.serve.threads import on_passing_thread

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "EngineClosed",
    "QueueFull",
    "RequestCancelled",
    "RequestHandle",
    "on_passing_thread",
]
