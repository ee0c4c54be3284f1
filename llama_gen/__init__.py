"""llama_gen: a readable, fast, from-scratch PyTorch decoding engine for Llama-style models."""

from llama_gen.chat_format import Dialog, Message
from llama_gen.generation import ChatPrediction, CompletionPrediction, Llama
from llama_gen.loop import StreamChunk
from llama_gen.model import ModelArgs, Transformer
from llama_gen.options import GenerationOptions
from llama_gen.sampling import SamplingParams
from llama_gen.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Llama", "GenerationOptions", "ModelArgs", "Transformer", "Message", "Dialog", "StreamChunk"]
__all__ += ["CompletionPrediction", "ChatPrediction", "SamplingParams", "Tokenizer", "load_tokenizer"]
