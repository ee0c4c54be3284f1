"""llama_gen.fast.prepare: the fast path's one entry point (what Llama.build's compile and quantize do)."""

import subprocess
import sys

import pytest
from conftest import LLAMA2_TOKENIZER
from test_engine import build

from llama_gen.fast import FastForward, prepare
from llama_gen.fast.layout import int8_kernels
from llama_gen.fast.quantize import Int8Linear


def test_prepare_without_compile_or_quantize_leaves_the_model_eager(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    llama = build(ckpt)
    assert prepare(llama.model) is None
    assert llama.model.layers[0].attention.wqkv is None  # untouched: not even fused


def test_prepare_int8_gives_its_layers_this_cpus_kernels(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["gqa"]
    llama = build(ckpt)
    fast = prepare(llama.model, quantize="int8")
    assert isinstance(fast, FastForward) and not fast.compiled
    layers = [m for m in llama.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.kernels == int8_kernels() for m in layers)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_eager_decoding_never_imports_the_compiler(tiny_checkpoints, quantize):
    # torch._dynamo costs ~74 MiB resident; without compile=True nothing needs it (a fresh process: this one has it)
    _, ckpt = tiny_checkpoints["gqa"]
    code = (
        f"import sys; from llama_gen import Llama; "
        f"llama = Llama.build({str(ckpt)!r}, tokenizer_path={str(LLAMA2_TOKENIZER)!r}, max_seq_len=64, "
        f"max_batch_size=2, device='cpu', quantize={quantize!r}); "
        f"llama.text_completion(['Hello', 'A longer prompt'], max_gen_len=4, temperature=0.7, logprobs=True); "
        f"print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
