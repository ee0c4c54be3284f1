"""GenerationOptions: every per-call setting of a generation, validated once when it is made."""

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llama_gen.sampling import SamplingParams

# The reference's defaults (Meta's example scripts), used where neither the call nor the checkpoint says.
LIBRARY_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
# transformers' defaults, for the fields left out of a Hugging Face generation_config.json (one with do_sample)
HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0, "repetition_penalty": 1.0}
SAMPLING_FIELDS = tuple(LIBRARY_DEFAULTS)


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate: sampling, stops, seed, length and logprobs. ``None`` means "the checkpoint's
    generation_config.json, else the default": transformers' where that file has do_sample (false: greedy), else
    the reference's (temperature 0.6, top_p 0.9).

    Made once and validated then (a ValueError names the field and its valid range); every generation call
    accepts one as ``options=`` and the reference's arguments override its fields.
    """

    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_gen_len: int | None = None  # None: the checkpoint's max_new_tokens, else up to the window
    stop: tuple[str, ...] = ()  # strings that end a generation (may span tokens); not part of the output
    stop_token_ids: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a generation
    seed: int | None = None  # None: the process's generator (seeded by Llama.build)
    logprobs: bool = False
    echo: bool = False  # include the prompt in generate's and text_completion's outputs
    skip_special_tokens: bool = True  # leave special tokens (e.g. <|im_start|>) out of the generated text

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        SamplingParams(**{**LIBRARY_DEFAULTS, **given})  # raises on the first bad field
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_sequences(self.stop_token_ids))
        if self.max_gen_len is not None and not is_int(self.max_gen_len, low=0):
            raise ValueError(f"max_gen_len must be a non-negative integer, got {self.max_gen_len!r}")
        if self.seed is not None and not (is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) (torch.Generator's range), got {self.seed!r}")
        for name in ("logprobs", "echo", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_call(
        cls, options: "GenerationOptions | None", more: dict, names: Sequence[str] = (), args: Sequence = ()
    ) -> "GenerationOptions":
        """Returns ``options`` (default: all defaults) with the fields a call gives replaced: ``more`` by keyword,
        ``args`` positionally (the fields ``names``, in order, as the reference's calls take them)."""
        if options is not None and not isinstance(options, cls):
            raise ValueError(f"options must be a GenerationOptions, got {type(options).__name__}")
        if len(args) > len(names):
            raise TypeError(f"at most {len(names)} positional options ({', '.join(names)}), got {len(args)}")
        given = dict(zip(names, args))
        if given.keys() & more.keys():
            raise TypeError(f"got multiple values for {', '.join(sorted(given.keys() & more.keys()))}")
        given.update(more)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(given) - known:
            raise ValueError(
                f"unknown generation option(s) {', '.join(sorted(set(given) - known))}: use one of "
                f"{', '.join(sorted(known))}"
            )
        # None (and False, the reference's default for logprobs and echo) mean "not given": options' value stays
        changes = {k: v for k, v in given.items() if v is not None and not (v is False and k in ("logprobs", "echo"))}
        return dataclasses.replace(options or cls(), **changes) if changes or options is None else options

    def sampling(self, config: Mapping) -> SamplingParams:
        """Returns the sampling settings: these options, else the checkpoint's ``config``, else the defaults."""
        values, defaults = {}, HF_DEFAULTS if "do_sample" in config else LIBRARY_DEFAULTS
        config = {**config, "temperature": 0} if config.get("do_sample") is False else config  # greedy
        for name in SAMPLING_FIELDS:
            value = getattr(self, name)
            value = config.get(name) if value is None else value
            values[name] = defaults[name] if value is None else value
        return SamplingParams(**values)


def is_int(value: object, low: int | None = None) -> bool:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return ok and (low is None or value >= low)


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else stop or ()
    if not isinstance(stops, tuple) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    return stops


def _stop_sequences(ids: Sequence[int | Sequence[int]] | None) -> tuple[tuple[int, ...], ...]:
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"stop_token_ids must be a list of token ids or of token-id lists, got {ids!r}")
    seqs = tuple((s,) if is_int(s) else tuple(s) if isinstance(s, Sequence) else s for s in ids or ())
    if not all(isinstance(s, tuple) and s and all(is_int(t) for t in s) for s in seqs):
        raise ValueError(f"stop_token_ids must be a list of token ids or of token-id lists, got {ids!r}")
    return seqs
