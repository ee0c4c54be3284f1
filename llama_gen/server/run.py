"""Running the server: uvicorn on a socket of our own, and a graceful stop on SIGTERM (or Ctrl-C).

On the signal the server stops accepting connections, answers new generations on open ones with 503, and lets the
requests in flight finish; those still running ``drain_timeout`` seconds later are cancelled (their streams end
with an error event, their non-streaming calls with 503). Then the engine closes and ``serve`` returns, so the
process exits with status 0.
"""

import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn

from llama_gen.server.app import OpenAIServer

SIGNALS = (signal.SIGINT, signal.SIGTERM)
BACKSTOP_S = 5.0  # after the deadline: for cancelled streams to end before uvicorn cuts the connections


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling ``on_signal`` when the first stop signal comes."""

    def __init__(self, config: uvicorn.Config, on_signal) -> None:
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self.on_signal()
        super().handle_exit(sig, frame)


def listen(host: str, port: int) -> socket.socket:
    """Returns a socket bound to (host, port): port 0 picks a free one. Raises ValueError when it can't."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --host or --port") from None
    return sock


def serve(server: OpenAIServer, host: str, port: int, drain_timeout: float, log_level: str = "info") -> None:
    """Serves until SIGTERM or Ctrl-C, then drains (see the module's docstring) and closes the engine; returns
    None."""
    sock = listen(host, port)
    deadline = threading.Timer(drain_timeout, server.engine.close)  # cancels whatever is still running
    deadline.daemon = True

    def drain() -> None:
        server.draining = True
        deadline.start()

    config = uvicorn.Config(
        server.app(), log_level=log_level, lifespan="off", timeout_graceful_shutdown=drain_timeout + BACKSTOP_S
    )
    # uvicorn raises the stop signal again once it has stopped; a no-op handler lets the drained process exit 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in SIGNALS}
    try:
        shown = f"[{host}]" if ":" in host else host
        print(
            f"serving {server.model_name} at http://{shown}:{sock.getsockname()[1]}/v1 (OpenAI API; /health, "
            "/metrics); SIGTERM or Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        DrainingServer(config, drain).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        deadline.cancel()
        server.engine.close()
