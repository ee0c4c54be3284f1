"""The fast decoding path (optional): int8 weights, fused projections, CPU weight layouts, a compiled decode step.

``prepare`` is the one entry point (``Llama.from_model`` calls it lazily). In the order it runs:

* llama_gen.fast.layout: ``choose_layout`` decides, once, every load-time weight change and kernel for this
  model and CPU (llama_gen.fast.cpu); ``apply_layout`` quantizes (llama_gen.fast.quantize: per-channel int8, or
  group-wise int8/int4 in llama.cpp's block layout, llama_gen.fast.groupwise), fuses projections and lays the
  weights out for their kernels (llama_gen.fast.packed, llama_gen.fast.gemv).
* llama_gen.fast.qcheckpoint: quantized checkpoints, written (``llama-gen quantize``) and loaded (the lazy hook of
  llama_gen.checkpoint.load_model for a params.json that records a quantization).
* llama_gen.fast.memory: the weights move onto huge pages, never held twice while they change.
* llama_gen.fast.forward: ``FastForward`` runs prompts eagerly and single tokens through the static-shape
  decode step (llama_gen.fast.step), compiled on first use: ahead of time in a child process on CPU
  (llama_gen.fast.aot), else with ``torch.compile``.
"""

from llama_gen.fast.aot import uses_aot
from llama_gen.fast.forward import FastForward, free_compiler_memory
from llama_gen.fast.layout import apply_layout, can_fuse, choose_layout
from llama_gen.fast.memory import move_to_huge_pages
from llama_gen.fast.quantize import check_quantization
from llama_gen.fast.quantize import quantize as quantize_model
from llama_gen.model import Transformer

__all__ = ["FastForward", "check_quantization", "prepare"]


def prepare(model: Transformer, compile: bool = False, quantize: str | None = None) -> FastForward | None:
    """Applies the load-time speed-ups in place and returns the forward to decode with (None: plain eager).

    Without model parallel: the weights change as choose_layout decides (apply_layout) and, for a compiled
    step on CPU, move onto huge pages; the FastForward returned compiles its decode step on first use with
    ``compile``: ahead of time in a child process on CPU (llama_gen.fast.aot), else with ``torch.compile``.
    With model parallel, fairscale's layers stay as they are: eager, and int8 is refused.
    """
    if not (compile or quantize):
        return None
    layout = choose_layout(model, compile, quantize)
    if not can_fuse(model):  # model parallel: fairscale's layers and collectives stay eager
        quantize_model(model, quantize, layout.int8)  # (refuses, with its reason)
        return FastForward(model, compile=False)
    apply_layout(model, layout)
    if compile and model.norm.weight.device.type == "cpu":
        move_to_huge_pages(model)
    fast = FastForward(model, compile=compile, aot_layout=layout if compile and uses_aot(model) else None)
    free_compiler_memory()  # the replaced layers, before the first prompt (bf16 b8 peak 591 vs 604 MiB without)
    return fast
