"""The ``llama-gen`` command: ``chat``, ``complete``, ``serve``, ``info``, ``convert``, ``reshard``, ``perplexity``
and ``quantize`` subcommands.

    llama-gen chat [--ckpt_dir DIR] [--temperature 0] [--system "..."] ...
    llama-gen complete PROMPTS.jsonl [--output OUT.jsonl] [--max_batch_size 8] ...
    llama-gen serve [--ckpt_dir DIR] [--port 8000] [--api_key KEY] ...
    llama-gen info [--ckpt_dir DIR] [--max_seq_len 4096] [--max_batch_size 8]
    llama-gen convert [SRC OUT_DIR] [--dtype float32]
    llama-gen reshard ...
    llama-gen perplexity [FILE] [--window 512] [--stride 256] [--quantize int4-g32]
    llama-gen quantize CKPT_DIR OUT_DIR [--scheme int8-g32]

Each subcommand is imported only when used, so ``llama-gen info`` starts fast.
"""

import importlib
import sys
from collections.abc import Callable

import fire

# name -> (module, function); the function is looked up when the command runs.
COMMANDS = {
    "chat": ("llama_gen.apps.chat", "main"),
    "complete": ("llama_gen.apps.batch", "main"),
    "serve": ("llama_gen.apps.serve", "main"),
    "info": ("llama_gen.apps.info", "main"),
    "convert": ("llama_gen.apps.convert", "main"),
    "reshard": ("llama_gen.convert.reshard", None),
    "perplexity": ("llama_gen.apps.perplexity", "main"),
    "quantize": ("llama_gen.apps.quantize", "main"),
}


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
