"""Loading on a passing thread, so that the engine's thread is the only one with PyTorch's CPU threads.

PyTorch's CPU kernels run on OpenMP (GNU libgomp), which keeps a pool of worker threads for every thread that
ran a parallel region, for as long as that thread lives. Once the process holds more OpenMP threads than CPUs,
libgomp stops its idle workers from spinning between regions (they sleep at once), so every one of a decode
step's ~250 kernels pays a wake-up. A model loaded on the main thread leaves the main thread's pool behind, and
the engine's thread then makes a second one: on 2 CPUs with 2 threads the default model's batch-8 step took
55 ms on the engine's thread instead of 41 ms (loaded on a thread that had ended). A pool ends with its thread.
"""

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Returns fn(*args, **kwargs), run on a new thread that ends when it returns (its exception is raised here).

    For the work done before an engine starts (loading the model, warming it up): the OpenMP threads that work
    makes end with it, and the engine's thread is left the only one with a pool. Ctrl-C here leaves the thread
    to finish on its own (a daemon)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - raised again in the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="llama_gen-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
