"""The compiled decode step, built in the background while a model already answers eagerly.

Building the step ahead of time takes 1-2 minutes the first time (then it is cached on disk). A program need not
wait for it: ``BackgroundCompile`` starts the build (a child process, llama_gen.fast.aot) on a thread and the
program decodes eagerly meanwhile; once the build is done, the thread that runs the model calls ``switch()``
between two steps, which lays the weights out for the compiled step (as ``prepare`` does) and carries the KV
cache over, so sequences in flight go on where they were. A program that ends first stops the build
(``cancel()``).
"""

import subprocess
import threading

import torch

from llama_gen.fast import prepare
from llama_gen.fast.aot import ensure_package, step_spec, uses_aot
from llama_gen.fast.forward import FastForward
from llama_gen.fast.layout import can_fuse, choose_layout
from llama_gen.model import Transformer


def can_compile_in_background(model: Transformer) -> bool:
    """True where the step is built ahead of time in a child process (CPU, one rank): the model is untouched until
    the switch. Elsewhere (GPU, model parallel) compilation happens in the process and is done up front."""
    return uses_aot(model) and can_fuse(model)


class BackgroundCompile:
    """Builds the compiled decode step of ``model`` (for ``max_batch_size`` rows) on a background thread.

    ``ready()`` says whether the build ended; ``switch()``, called by the thread that runs the model, returns the
    compiled FastForward (or raises the build's error). The model must be unprepared (built with neither compile
    nor quantize) and must not run while ``switch()`` does.
    """

    def __init__(self, model: Transformer):
        if not can_compile_in_background(model):
            raise ValueError("the decode step is built in the background only on CPU without model parallel")
        self.model = model
        self.layout = choose_layout(model, compile=True, quantize=None)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.child: subprocess.Popen | None = None  # the build, while it runs
        self.cancelled = False
        spec = step_spec(model, model.args.max_batch_size, self.layout)
        self.thread = threading.Thread(target=self._build, args=(spec,), name="llama_gen-compile", daemon=True)
        self.thread.start()

    def _build(self, spec: dict) -> None:
        try:
            ensure_package(spec, on_start=self._started)
        except BaseException as error:  # noqa: BLE001 - reported by switch(), on the model's thread
            self.error = error
        self.done.set()

    def _started(self, child: subprocess.Popen) -> None:
        self.child = child
        if self.cancelled:
            child.kill()

    def cancel(self) -> None:
        """Stops the build if it still runs (its package is not kept: the next run builds it again)."""
        self.cancelled = True
        if self.child is not None and self.child.poll() is None:
            self.child.kill()

    def ready(self) -> bool:
        """True once the build has ended (successfully or not)."""
        return self.done.is_set()

    def switch(self) -> FastForward:
        """Prepares the model for the compiled step (its weights laid out, its KV cache carried over) and returns
        the compiled FastForward; raises the build's error instead when it failed (the model is then unchanged)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        caches = [(layer.attention.cache_k, layer.attention.cache_v) for layer in self.model.layers]
        fast = prepare(self.model, compile=True)  # reallocates the caches, padded for the compiled step
        with torch.no_grad():
            for layer, (old_k, old_v) in zip(self.model.layers, caches):
                held = min(old_k.shape[1], layer.attention.cache_k.shape[1])
                layer.attention.cache_k[:, :held].copy_(old_k[:, :held])
                layer.attention.cache_v[:, :held].copy_(old_v[:, :held])
        return fast
