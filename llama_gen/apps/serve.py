"""An OpenAI-compatible HTTP server on the serving engine (llama_gen.server).

    python scripts/serve.py [--ckpt_dir DIR] [--port 8000] [--max_batch_size 8] [--api_key KEY] ...
    torchrun --nproc_per_node 2 scripts/serve.py --ckpt_dir DIR        # model parallel: rank 0 serves HTTP

Endpoints: POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models, /health, /metrics.
Binds 127.0.0.1 unless --host says otherwise. The sampling flags are the defaults of parameters a request leaves
out (then the checkpoint's generation_config.json, then the library's); --max_gen_len is the default max_tokens.
--api_key (or the environment variable LLAMA_GEN_API_KEY) makes every endpoint but /health require the header
``Authorization: Bearer KEY``. SIGTERM or Ctrl-C: stop accepting, let requests in flight finish for up to
--drain_timeout seconds (then cancel them), exit 0.

Under torchrun with model parallel every rank runs the engine: rank 0 serves HTTP and schedules, the other ranks
make the same model calls (llama_gen.serve.ranks). By default the first requests are answered with the eager decode
step while the compiled one builds in the background (--compile auto; --compile: before serving; --nocompile).
"""

import os
import sys
from pathlib import Path

from llama_gen import parallel
from llama_gen.apps import flags
from llama_gen.apps.errors import friendly_errors
from llama_gen.apps.flags import COMPILE_AUTO, MODEL_FLAGS, SAMPLING_FLAGS, STOP_FLAG, Flag, select, takes
from llama_gen.generation import Llama
from llama_gen.serve import Engine
from llama_gen.serve.ranks import follow, schedules
from llama_gen.serve.threads import on_passing_thread
from llama_gen.server import OpenAIServer, serve

API_KEY_ENV = "LLAMA_GEN_API_KEY"
SERVER_FLAGS = (
    Flag("host", "127.0.0.1", str, "the address to listen on (0.0.0.0: every interface)"),
    Flag("port", 8000, int, "the port to listen on (0: a free one, printed at start)"),
    Flag(
        "api_key", None, str | None, f"require it as a bearer token on every endpoint but /health (or ${API_KEY_ENV})"
    ),
    Flag("model_name", None, str | None, "the model id clients send (default: the checkpoint directory's name)"),
    Flag("max_queue", 256, int, "requests waiting for a slot at most; more get 429 with Retry-After"),
    Flag("max_body_bytes", 1 << 20, int, "the largest request body accepted; larger ones get 413"),
    Flag(
        "drain_timeout", 30.0, float, "on SIGTERM: seconds requests in flight get to finish before they are cancelled"
    ),
    Flag("prefill_chunk", 256, int, "prompt tokens prefilled per engine step (bounds the pause a long prompt causes)"),
    Flag("log_level", "info", str, "uvicorn's log level: debug, info, warning, error (info logs every request)"),
)


def check_server_flags(values: dict) -> dict:
    """Raises ValueError naming the first bad server flag; returns the generation defaults the flags give."""
    flags.check_model_flags(values)
    defaults = flags.check_sampling_flags(values)
    for name, low in (("port", 0), ("max_queue", 1), ("max_body_bytes", 1), ("prefill_chunk", 1)):
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (name == "port" and value > 65535):
            raise ValueError(
                f"--{name} must be an integer >= {low}{' and <= 65535' if name == 'port' else ''}, got {value!r}"
            )
    timeout = values["drain_timeout"]
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
        raise ValueError(f"--drain_timeout must be a number of seconds >= 0, got {timeout!r}")
    if values["log_level"] not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ValueError(f"--log_level must be one of debug, info, warning, error, got {values['log_level']!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if values["model_parallel_size"] not in (None, world):
        raise ValueError(
            f"the server runs one copy of the model: --model_parallel_size must equal the number of processes "
            f"({world}), got {values['model_parallel_size']}"
        )
    return defaults


def model_name(values: dict) -> str:
    """Returns the id clients name the model by: --model_name, else the checkpoint directory's name."""
    if values["model_name"] is not None:
        return str(values["model_name"])
    if values["ckpt_dir"] is not None:
        return Path(str(values["ckpt_dir"])).expanduser().absolute().name
    from llama_gen.convert import ensure_default_model

    return Path(ensure_default_model()).name


@friendly_errors
@takes(select(MODEL_FLAGS, max_batch_size=8, compile=COMPILE_AUTO), SAMPLING_FLAGS, [STOP_FLAG], SERVER_FLAGS)
def main(values: dict) -> None:
    """Serves the model over HTTP with OpenAI's API until SIGTERM or Ctrl-C; returns None.

    No --ckpt_dir: the default SmolLM2-135M-Instruct. Sampling flags: the defaults of what a request leaves out.
    """
    defaults = check_server_flags(values)
    api_key = values["api_key"] if values["api_key"] is not None else os.environ.get(API_KEY_ENV) or None
    name = model_name(values)
    llama = on_passing_thread(Llama.build, **flags.model_flags(values))  # (why: llama_gen.serve.threads)
    # On every rank: under model parallel the compiled step's first calls run together.
    on_passing_thread(warm_up, llama)
    if not schedules():  # model parallel: this rank makes the model calls of rank 0's engine
        follow(llama)
        parallel.shutdown_distributed()
        return
    engine = Engine(
        llama, max_queue=values["max_queue"], prefill_chunk=values["prefill_chunk"],
        compile_in_background=flags.compile_in_background(values),
    )  # fmt: skip
    server = OpenAIServer(
        engine,
        name,
        defaults,
        api_key=None if api_key is None else str(api_key),
        max_body_bytes=values["max_body_bytes"],
    )
    serve(server, str(values["host"]), values["port"], float(values["drain_timeout"]), values["log_level"])
    parallel.shutdown_distributed()


def warm_up(llama: Llama) -> None:
    """With --compile: builds the engine's compiled decode step now (cached on disk), before the first request."""
    if getattr(llama.forward, "compiled", False):  # a compiled llama_gen.fast.FastForward
        say = parallel.model_parallel_rank() == 0
        if say:
            print("compiling the decode step (cached on disk for the next run)...", file=sys.stderr, flush=True)
        seconds = llama.forward.warm_up((llama.model.args.max_batch_size,))
        if say:
            print(f"compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
