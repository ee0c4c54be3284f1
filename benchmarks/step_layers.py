"""Where a compiled batch-1 decode step's time goes: the same step with the model cut to fewer layers.

    python benchmarks/step_layers.py [--ckpt checkpoints/smollm2-135m-instruct-q4_1] [--layers 1,4,30]
                                     [--positions 40,500] [--quantize int8-g32] [--dtype bfloat16]

For each layer count the checkpoint is loaded, ``model.layers`` cut to that many, and the model prepared as the
compiled fast path prepares it (``llama_gen.fast.prepare``: its Layout, huge pages, the ahead-of-time step of
llama_gen.fast.aot in the default cache; a new layer count is a new package, built once). The difference between two
counts is what the layers cost; what is left at one layer is the embedding, the output layer and the step's fixed
work. Each figure is the best of 5 rounds of 50 steps at that position, 2 threads. Run it alone: other processes on
the 2 cores change it.
"""

import argparse
import time

import torch

from llama_gen.checkpoint import load_model
from llama_gen.fast import FastForward, prepare
from llama_gen.tokenizer import load_tokenizer

MAX_SEQ_LEN = 1024


def cut_model_forward(ckpt: str, n_layers: int, quantize: str | None, dtype: torch.dtype) -> FastForward:
    """Returns the compiled fast path (as ``Llama.build(compile=True)`` prepares it) of the checkpoint's model cut
    to its first n_layers layers."""
    sizes = {"max_seq_len": MAX_SEQ_LEN, "max_batch_size": 1}
    model = load_model(ckpt, load_tokenizer(ckpt), torch.device("cpu"), dtype, **sizes)
    model.layers = model.layers[:n_layers]
    model.args.n_layers = n_layers
    return prepare(model, compile=True, quantize=quantize)


def step_ms(forward: FastForward, pos: int) -> float:
    """Returns the best-of-5 mean time (ms) of 50 single-token steps at position pos."""
    tokens = torch.tensor([[5]])
    for _ in range(20):
        forward(tokens, pos)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            forward(tokens, pos)
        best = min(best, (time.perf_counter() - start) / 50 * 1e3)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="checkpoints/smollm2-135m-instruct-q4_1")
    p.add_argument("--layers", default="1,4,30", help="comma-separated layer counts")
    p.add_argument("--positions", default="40,500", help="comma-separated positions (< 1024)")
    p.add_argument("--quantize", default=None, help="a scheme for a float checkpoint (int8-g32, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    torch.set_num_threads(2)
    for n_layers in [int(n) for n in args.layers.split(",")]:
        forward = cut_model_forward(args.ckpt, n_layers, args.quantize, getattr(torch, args.dtype))
        for pos in [int(n) for n in args.positions.split(",")]:
            ms = step_ms(forward, pos)
            print(f"layers {n_layers:3d}  position {pos:4d}  step {ms:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
