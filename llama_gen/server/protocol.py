"""OpenAI's API shapes: the request bodies (pydantic models, validated strictly), the engine options they make, the
response and stream-chunk bodies, and OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``).

Everything about a request is checked here, before it reaches the engine: a bad body is an APIError (a 4xx whose
message names the parameter and says what a valid value is), never a traceback.
"""

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama_gen.options import GenerationOptions
from llama_gen.serve import Completion

MAX_N = 128  # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's


class APIError(Exception):
    """A request that fails with an HTTP status and OpenAI's error JSON."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Returns raw (a JSON request body) validated as model; raises APIError 400 saying what is wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(error: ValidationError) -> APIError:
    """Returns the APIError for pydantic's first complaint: ``param: what is wrong``."""
    problems = error.errors()
    first = problems[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    if not param and first["type"] == "value_error":  # a check of several fields: it names its own
        return APIError(400, message, param=message.split()[0].rstrip(":"))
    if first["type"] == "extra_forbidden":
        message = "unknown parameter (this server does not support it); remove it"
    elif first["type"] == "missing":
        message = "required parameter missing"
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return APIError(400, f"{param}: {message}{more}" if param else message + more, param=param or None)


# ---- requests ---------------------------------------------------------------------------------------------------
class Strict(BaseModel):
    """JSON types as given: a string is not a number, true is not 1; unknown parameters are errors (as OpenAI's)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationRequest(Strict):
    """What both endpoints take. top_k, min_p and repetition_penalty extend OpenAI's API; a parameter left out
    takes the server's command-line flag, else the checkpoint's generation_config.json, else the library default.
    """

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: Any = None  # a string or a list of strings
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's, accepted at their neutral values only
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logit_bias: dict[str, float] | None = None
    # accepted and ignored (as OpenAI stores them, with no effect on the output)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: Any) -> list[str] | None:
        if stop is None or isinstance(stop, str):
            return None if stop is None else [stop]
        if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            return stop
        raise ValueError(f"must be a string or a list of strings, got {stop!r}")

    @model_validator(mode="after")
    def _neutral_only(self) -> "GenerationRequest":
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name} is not supported (only 0); use repetition_penalty instead")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def engine_options(self, defaults: dict, max_tokens: int | None) -> dict:
        """Returns the engine's generation options (GenerationOptions fields): these parameters over defaults (the
        server's flags); raises APIError 400 naming a value out of range."""
        given = dict(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, max_gen_len=max_tokens, stop=self.stop, seed=self.seed,
        )  # fmt: skip
        options = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        try:
            GenerationOptions(**options)
        except ValueError as e:
            message = str(e).replace("max_gen_len", "max_tokens")
            raise APIError(400, message, param=message.split()[0]) from None
        return options


class ChatMessage(BaseModel):
    """One message. Fields OpenAI's responses carry (name, refusal, ...) may come back with it and are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: Any = None  # a string or a list of text parts (joined)

    @field_validator("content")
    @classmethod
    def _content(cls, content: Any) -> str | None:
        if content is None or isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) for p in content):
            if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                return "".join(p["text"] for p in content)
            kinds = sorted({str(p.get("type")) for p in content} - {"text"}) or ["text without a string 'text'"]
            raise ValueError(f"only text parts {{'type': 'text', 'text': ...}} are supported, got {', '.join(kinds)}")
        raise ValueError(f"must be a string or a list of text parts, got {json.dumps(content)[:80]}")

    def text(self, index: int) -> str:
        """Returns the message's text; raises APIError 400 when it has none."""
        if self.content is None:
            raise APIError(400, f"messages[{index}].content: required (a string)", param=f"messages[{index}].content")
        return self.content


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, str] | None = None
    tool_choice: str | None = None  # only "none"
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_only(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError('response_format: only {"type": "text"} is supported')
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: tools are not supported (only 'none')")
        return self

    def dialog(self) -> list[dict[str, str]]:
        """Returns the messages as a dialog for the chat format (OpenAI's "developer" role is the system's)."""
        roles = {"developer": "system"}
        return [{"role": roles.get(m.role, m.role), "content": m.text(i)} for i, m in enumerate(self.messages)]

    def options(self, defaults: dict) -> dict:
        return self.engine_options(
            defaults, self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        )


class CompletionRequest(GenerationRequest):
    prompt: Any  # a string, a list of strings, a list of token ids, or a list of such lists
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None  # only equal to n
    suffix: str | None = None  # not supported

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: Any) -> list[str | list[int]]:
        def is_ids(p: Any) -> bool:
            return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        if isinstance(prompt, str):
            return [prompt]
        if is_ids(prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
            return prompt
        raise ValueError(
            "must be a string, a list of strings, a non-empty list of token ids, or a list of such lists, "
            f"got {json.dumps(prompt)[:80]}"
        )

    @model_validator(mode="after")
    def _completion_only(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix is not supported; leave it out")
        if self.best_of not in (None, self.n):
            raise ValueError(f"best_of is not supported (only equal to n={self.n})")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (the prompt's logprobs are not computed)")
        return self

    def options(self, defaults: dict) -> dict:
        return self.engine_options(defaults, self.max_tokens)


# ---- responses --------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(id: str, kind: str, model: str, created: int | None = None) -> dict:
    """Returns the fields every response and chunk starts with."""
    return {"id": id, "object": kind, "created": created or int(time.time()), "model": model}


def finish_reason(reason: str | None) -> str | None:
    return FINISH_REASONS.get(reason, reason) if reason else None


def usage(prompts: list[Completion], completions: list[Completion]) -> dict:
    """Returns OpenAI's usage: prompts (one completion per distinct prompt) and every completion's tokens."""
    n_prompt = sum(c.prompt_tokens for c in prompts)
    n_out = sum(c.completion_tokens for c in completions)
    cached = sum(c.cached_tokens for c in prompts)
    return {
        "prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
        "prompt_tokens_details": {"cached_tokens": cached},
    }  # fmt: skip


def chat_logprobs(pieces: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]) -> dict:
    """Returns a chat choice's ``logprobs``: per token its text, logprob, UTF-8 bytes and top alternatives."""

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {**entry(piece, lp), "top_logprobs": [entry(t, v) for t, v in top] if tops else []}
        for piece, lp, top in zip(pieces, logprobs, tops or [[]] * len(pieces))
    ]
    return {"content": content}


def completion_logprobs(
    pieces: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]], offset: int
) -> dict:
    """Returns a completion choice's ``logprobs`` (the legacy shape); offset: the text's start in the output."""
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    top = [dict(t) for t in tops] if tops else None
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}
