"""The ``llama-gen`` command: ``chat``, ``complete``, ``info``, ``convert`` and ``reshard`` subcommands.

    llama-gen chat [--ckpt_dir DIR] [--temperature 0] [--system "..."] ...
    llama-gen complete PROMPTS.jsonl [--output OUT.jsonl] [--max_batch_size 8] ...
    llama-gen info [--ckpt_dir DIR] [--max_seq_len 4096] [--max_batch_size 8]
    llama-gen convert [SRC OUT_DIR] [--dtype float32]
    llama-gen reshard ...

Each subcommand is imported only when used, so ``llama-gen info`` starts fast.
"""

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import fire

# name -> (module, function); the function is looked up when the command runs.
COMMANDS = {
    "chat": ("llama_gen.apps.chat", "main"),
    "complete": ("llama_gen.apps.batch", "main"),
    "info": ("llama_gen.apps.info", "main"),
    "convert": ("llama_gen.apps.cli", "convert"),
    "reshard": ("llama_gen.convert.reshard", None),
}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


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


@friendly_errors
def convert(src: str | None = None, out_dir: str | None = None, dtype: str = "float32") -> None:
    """Converts a GGUF file or Hugging Face directory into a checkpoint directory (no SRC: the default model);
    prints the directory and returns None."""
    from llama_gen.convert import convert as convert_checkpoint
    from llama_gen.convert import ensure_default_model

    if src is None:
        print(ensure_default_model(out_dir))
    elif out_dir is None:
        raise ValueError("usage: llama-gen convert SRC OUT_DIR [--dtype float32|bfloat16|float16]")
    else:
        print(convert_checkpoint(src, out_dir, dtype))


def load_command(name: str) -> Callable:
    """Returns the function behind subcommand ``name`` (imported now)."""
    module_name, attr = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise SystemExit(
            f"error: `llama-gen {name}` is not available in this install ({module_name} is missing)"
        ) from None
    for candidate in [attr] if attr else ["main", name]:
        if callable(getattr(module, candidate, None)):
            return getattr(module, candidate)
    raise SystemExit(f"error: {module_name} has no main() for `llama-gen {name}`")


def usage() -> str:
    """Returns the top-level help text."""
    return (__doc__ or "").strip() + "\n\nRun `llama-gen COMMAND --help` for a command's flags.\n"


def main(argv: list[str] | None = None) -> None:
    """Runs the subcommand named by argv[0] (default: sys.argv[1:]) with fire; returns None."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        sys.exit(2)
    fire.Fire(load_command(name), command=rest, name=f"llama-gen {name}")


if __name__ == "__main__":
    main()
