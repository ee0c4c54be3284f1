"""An OpenAI-compatible HTTP server (optional) on the serving engine: Starlette and uvicorn, streams as SSE.

``OpenAIServer(engine, model_name, ...)`` holds the endpoints (``.app()`` is the ASGI app), ``serve`` runs it with
a graceful stop on SIGTERM. The program is ``llama-gen serve`` (llama_gen.apps.serve).
"""

from llama_gen.server.app import OpenAIServer
from llama_gen.server.protocol import APIError
from llama_gen.server.run import serve

__all__ = ["APIError", "OpenAIServer", "serve"]
