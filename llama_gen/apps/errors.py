"""Friendly errors: bad input ends a program with one ``error: ...`` line and status 2, not a traceback."""

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

# NotImplementedError: a model or file this engine does not support (e.g. a sliding window), named with the reason
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    NotImplementedError,
)


def friendly_errors(fn: Callable) -> Callable:
    """Returns fn wrapped so that bad input ends the program with 'error: ...' and status 2, not a traceback.

    Set LLAMA_GEN_TRACEBACK=1 to see the traceback anyway.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("LLAMA_GEN_TRACEBACK"):
                raise
            rank = int(os.environ.get("RANK", "0"))
            prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
