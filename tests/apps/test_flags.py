"""The programs' shared flags: one definition, composed into each command's signature, checked before loading."""

import dataclasses
import inspect
import subprocess
import sys

import pytest
from conftest import REPO

from llama_gen.apps import batch, chat, flags, info
from llama_gen.apps.flags import MODEL_FLAGS, SAMPLING_FLAGS, STOP_FLAG, Flag, takes
from llama_gen.generation import Llama
from llama_gen.options import GenerationOptions


def params(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def test_model_flags_are_llama_build_parameters():
    build = params(Llama.build)
    assert flags.names(MODEL_FLAGS) == tuple(build)  # same names, same order
    assert {f.name: f.default for f in MODEL_FLAGS} == build


def test_sampling_flags_are_generation_options():
    fields = {f.name for f in dataclasses.fields(GenerationOptions)}
    assert set(flags.names((*SAMPLING_FLAGS, STOP_FLAG))) <= fields and set(flags.SETTINGS) <= fields


@pytest.mark.parametrize(
    "command, groups, defaults",
    [
        (chat.main, (MODEL_FLAGS, SAMPLING_FLAGS, chat.CHAT_FLAGS), dict(max_batch_size=1, seed=1, max_gen_len=None)),
        (
            batch.main,
            (batch.FILE_FLAGS, MODEL_FLAGS, SAMPLING_FLAGS, [STOP_FLAG], batch.OUTPUT_FLAGS),
            dict(max_batch_size=8, seed=1, max_gen_len=None, stop=None),
        ),
        (info.main, (info.SIZING_FLAGS, [info.JSON_FLAG]), dict(max_batch_size=4, model_parallel_size=1)),
    ],
)
def test_each_program_lists_every_flag_of_its_groups(command, groups, defaults):
    signature = params(command)
    assert list(signature) == [f.name for group in groups for f in group]
    assert {k: signature[k] for k in defaults} == defaults
    for group in groups:
        for f in group:
            assert f"{f.name}: {f.help}" in command.__doc__  # fire shows it under --help


def test_info_model_info_keeps_its_positional_order():
    assert list(params(info.model_info)) == [
        "ckpt_dir",
        "tokenizer_path",
        "max_seq_len",
        "max_batch_size",
        "device",
        "dtype",
        "model_parallel_size",
    ]


def test_takes_binds_positions_and_names_and_fills_defaults():
    group = (Flag("a", flags.REQUIRED, int, "first"), Flag("b", 2, int, "second"), Flag("c", None, str, "third"))

    @takes(group[:2], group[2:])
    def show(values: dict) -> dict:
        """Shows its values."""
        return values

    assert show(1) == {"a": 1, "b": 2, "c": None}
    assert show(1, c="x", b=5) == {"a": 1, "b": 5, "c": "x"}
    assert show.__doc__.startswith("Shows its values.\n\nArgs:\n    a: first\n")
    with pytest.raises(TypeError):
        show(1, d=3)
    with pytest.raises(TypeError):
        show()


def test_select_picks_in_order_and_replaces_defaults():
    picked = flags.select(MODEL_FLAGS, ["seed", "ckpt_dir"], seed=7)
    assert [(f.name, f.default) for f in picked] == [("seed", 7), ("ckpt_dir", None)]
    assert flags.select(MODEL_FLAGS, max_batch_size=1)[3].default == 1 and MODEL_FLAGS[3].default == 4
    with pytest.raises(TypeError, match="no flag named nope"):
        flags.select(MODEL_FLAGS, nope=1)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(max_seq_len=1), "--max_seq_len must be an integer >= 2, got 1"),
        (dict(max_batch_size=True), "--max_batch_size must be an integer >= 1"),
        (dict(model_parallel_size=0), "--model_parallel_size must be an integer >= 1"),
        (dict(seed="x"), "--seed must be an integer"),
        (dict(chat_format="nope"), "unknown chat format 'nope'"),
        (dict(quantize="int4"), "unknown quantization 'int4'"),
    ],
)
def test_check_model_flags(values, message):
    with pytest.raises(ValueError, match=message):
        flags.check_model_flags(values)


def test_model_flags_are_what_build_takes():
    values = {f.name: f.default for f in (*MODEL_FLAGS, *SAMPLING_FLAGS, *chat.CHAT_FLAGS)}
    flags.check_model_flags(values)
    build = flags.model_flags({**values, "ckpt_dir": 123})
    inspect.signature(Llama.build).bind(**build)
    assert build["ckpt_dir"] == "123" and set(build) == set(flags.names(MODEL_FLAGS))


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(temperature=-1), "--temperature must be"),
        (dict(top_p=0), "--top_p must be in"),
        (dict(top_k=-1), "--top_k must be"),
        (dict(min_p=1), "--min_p must be"),
        (dict(repetition_penalty=0), "--repetition_penalty must be"),
        (dict(max_gen_len=-2), "--max_gen_len must be"),
        (dict(stop=5), "--stop must be a string or a list"),
        (dict(stop=["a", ""]), "--stop must be a string or a list"),
    ],
)
def test_check_sampling_flags(values, message):
    with pytest.raises(ValueError, match=message):
        flags.check_sampling_flags(values)


def test_sampling_settings_keep_what_was_given():
    given = flags.check_sampling_flags(dict(temperature=0, top_p=None, stop="END", seed=3, other=1))
    assert given == {"temperature": 0, "stop": ["END"]}  # seed is a model flag on the command line
    assert flags.sampling_settings(dict(seed=3, stop=("a", "b"), max_gen_len=0)) == {
        "seed": 3,
        "stop": ["a", "b"],
        "max_gen_len": 0,
    }


@pytest.mark.parametrize("script, first", [("chat.py", None), ("complete.py", "PROMPTS")])
def test_help_lists_every_flag(script, first):
    done = subprocess.run(
        [sys.executable, f"scripts/{script}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr  # fire writes help to stderr when it is not a terminal
    command = chat.main if script == "chat.py" else batch.main
    for name in params(command):
        assert (first if name.upper() == first else f"--{name}=") in shown
