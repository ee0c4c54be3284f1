"""The fast decoding path (optional): fused projections, CPU weight layouts, int8, a compiled decode step."""

from llama_gen.fast.quantize import check_quantization
from llama_gen.fast.step import FastForward, prepare

__all__ = ["FastForward", "check_quantization", "prepare"]
