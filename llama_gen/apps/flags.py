"""The programs' flags, defined once: the model flags (``Llama.build``'s parameters) and the sampling flags, each
with its default and help. A command's signature, which is what ``fire`` parses and lists under ``--help``, is
composed from these groups; the values are checked here too, before anything is loaded.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llama_gen.chat_format import get_chat_format
from llama_gen.fast import check_quantization
from llama_gen.options import SAMPLING_FIELDS, GenerationOptions

REQUIRED = inspect.Parameter.empty  # the default of a flag that must be given
COMPILE_AUTO = "auto"  # --compile's default in the programs that serve (see compile_in_background)


@dataclass(frozen=True)
class Flag:
    name: str
    default: Any
    type: Any  # the annotation fire shows under --help
    help: str


# Llama.build's parameters, in its order (tests/apps/test_flags.py checks that they stay the same).
MODEL_FLAGS = (
    Flag("ckpt_dir", None, str | None, "checkpoint directory (default: SmolLM2-135M-Instruct, converted once)"),
    Flag("tokenizer_path", None, str | None, "tokenizer file or directory (default: the one in ckpt_dir)"),
    Flag("max_seq_len", 2048, int, "longest prompt plus reply, in tokens: the length of the KV cache"),
    Flag("max_batch_size", 4, int, "most sequences decoded at once"),
    Flag(
        "model_parallel_size", None, int | None, "ranks one copy of the model is split over (None: all the processes)"
    ),
    Flag("seed", 1, int, "seed of the sampling generator, the same on every rank"),
    Flag("device", None, str | None, "cpu, cuda, mps... (default: cuda if available, then mps, else cpu)"),
    Flag("dtype", None, str | None, "float32, bfloat16 or float16 (default: bf16 on GPUs that have it, else fp32)"),
    Flag("chat_format", None, str | None, "llama2, llama3, chatml... (default: the checkpoint's)"),
    Flag(
        "compile",
        False,
        bool | str,
        "compile the decode step, cached on disk for later runs: True = before answering, False = never, auto "
        "(the programs' default) = answer at once eagerly while it builds in the background, then switch to it",
    ),
    Flag(
        "quantize",
        None,
        str | None,
        "weight-only quantization at load time: int8 (per channel), int8-g32/64/128 or int4-g32/64/128 (group-wise; "
        "suffix -out4 or -outf: output layer and embedding in 4 bits or float, default 8); none for a checkpoint "
        "that is already quantized",
    ),
)
_UNSET = "(default: the checkpoint's generation_config.json, else "
SAMPLING_FLAGS = (
    Flag("temperature", None, float | None, "0 for greedy decoding " + _UNSET + "0.6)"),
    Flag("top_p", None, float | None, "nucleus sampling's probability mass, 1 to disable " + _UNSET + "0.9)"),
    Flag("top_k", None, int | None, "sample among the k likeliest tokens, 0 to disable " + _UNSET + "0)"),
    Flag("min_p", None, float | None, "drop tokens below min_p times the likeliest's probability " + _UNSET + "0)"),
    Flag("repetition_penalty", None, float | None, "penalty on tokens already seen, 1 to disable " + _UNSET + "1)"),
    Flag("max_gen_len", None, int | None, "most tokens generated per reply (the default is the program's)"),
)
# What a generation may be told, by flags or per JSONL record (the command line's seed is Llama.build's).
SETTINGS = (*SAMPLING_FIELDS, "max_gen_len", "stop", "seed")
STOP_FLAG = Flag("stop", None, Any, "a string, or a list of them, that ends a generation (not part of the output)")


def select(flags: Iterable[Flag], only: Iterable[str] | None = None, **defaults: Any) -> tuple[Flag, ...]:
    """Returns the flags named in ``only`` (in that order; None: all of them) with the defaults given replaced."""
    by_name = {f.name: f for f in flags}
    chosen = [by_name[n] for n in only] if only is not None else list(by_name.values())
    unknown = sorted(set(defaults) - {f.name for f in chosen})
    if unknown:
        raise TypeError(f"no flag named {', '.join(unknown)}")
    return tuple(dataclasses.replace(f, default=defaults[f.name]) if f.name in defaults else f for f in chosen)


def names(flags: Iterable[Flag]) -> tuple[str, ...]:
    """Returns the names of flags."""
    return tuple(f.name for f in flags)


def takes(*groups: Iterable[Flag]) -> Callable[[Callable[[dict], Any]], Callable[..., Any]]:
    """Returns a decorator for a function of one dict of flag values: the decorated function takes the flags of
    groups as arguments (positionally or by name, defaults filled in), as its signature and docstring say."""
    flags = [f for group in groups for f in group]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter(f.name, kind, default=f.default, annotation=f.type) for f in flags]
    )
    args_doc = "\n".join(f"    {f.name}: {f.help}" for f in flags)

    def decorate(fn: Callable[[dict], Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return fn(dict(bound.arguments))

        command.__signature__ = signature  # what fire and inspect.signature read
        command.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n{args_doc}\n"
        del command.__wrapped__  # the signature is the flags', not fn's
        return command

    return decorate


def _is_int(value: object, low: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def check_model_flags(values: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first bad model flag among values (those present); returns None."""
    for name, low in (("max_seq_len", 2), ("max_batch_size", 1), ("model_parallel_size", 1)):
        value = values.get(name)
        optional = name == "model_parallel_size"  # None: all the processes
        if name in values and not (optional and value is None) and not _is_int(value, low):
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    if "seed" in values and not _is_int(values["seed"]):
        raise ValueError(f"--seed must be an integer, got {values['seed']!r}")
    if values.get("chat_format") is not None:
        get_chat_format(values["chat_format"])
    if values.get("compile", False) not in (True, False, COMPILE_AUTO):
        raise ValueError(f"--compile must be True, False or {COMPILE_AUTO}, got {values['compile']!r}")
    check_quantization(values.get("quantize"))


def compile_in_background(values: Mapping[str, Any]) -> bool:
    """Whether the program compiles the decode step in the background (--compile auto, nothing quantized)."""
    return values.get("compile") == COMPILE_AUTO and values.get("quantize") is None


def model_flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """Returns Llama.build's arguments among values (paths as strings: fire makes numbers of numeric names)."""
    build = {name: values[name] for name in names(MODEL_FLAGS) if name in values}
    if build.get("compile") == COMPILE_AUTO:  # built eagerly; the program's engine compiles in the background
        build["compile"] = False
    for name in ("ckpt_dir", "tokenizer_path"):
        if build.get(name) is not None:
            build[name] = str(build[name])
    return build


def sampling_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the generation settings given among values (None means not given); a stop string becomes a list."""
    given = {k: values[k] for k in SETTINGS if values.get(k) is not None}
    if "stop" in given:
        stop = given["stop"]
        if not isinstance(stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        given["stop"] = [stop] if isinstance(stop, str) else list(stop)
    GenerationOptions(**given)  # validates: a ValueError names the first bad field
    return given


def check_sampling_flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the sampling settings given on the command line (see sampling_settings); raises ValueError naming a
    bad flag."""
    try:
        return sampling_settings({name: values.get(name) for name in names((*SAMPLING_FLAGS, STOP_FLAG))})
    except ValueError as e:
        raise ValueError(f"--{e}") from None
