"""The matmul kernels quantized weights could use on CPU, timed on the default model's linear layers: what chose
llama_gen.fast.groupwise's kernels (benchmarks/RESULTS.md).

    python benchmarks/quant_kernels.py [--rows 1,8] [--threads 2] [--repeat 200]

For each candidate, the time of all linear layers of one decode step (30 layers of fused wqkv, wo, fused w13, w2,
then the output layer), each product timed on its own and summed:

* columns int8-g32 / int4-g32: our Inductor loops on the column layout (llama_gen.fast.columns, what a compiled
  CPU step runs: tiles of 16 outputs, the rows a loop dimension), compiled in-process;
* loops int8-g32 / int4-g32: our earlier Inductor loops on llama.cpp's block layout (llama_gen.fast.gemv.
  loop_lanes_linear, still the one-row loops off CPU), one row only;
* int4pack fp32 / bf16: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (PyTorch's group-wise int4 kernel, the one
  torchao's CPU int4 layout calls) with float32 or bf16 activations, group 32;
* int8pack (per channel): ``torch.ops.aten._weight_int8pack_mm`` (bf16 activations), what ``--quantize int8`` uses;
* dequantize + matmul: the weight dequantized on every call, then float32's F.linear (our eager / many-row path);
* float32: F.linear on the float weight (MKL or oneDNN), for scale.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from llama_gen.fast.columns import loop_columns_linear, to_columns  # noqa: E402
from llama_gen.fast.gemv import loop_lanes_linear  # noqa: E402
from llama_gen.fast.groupwise import dequantize, quantize_groups, unpack_int4  # noqa: E402

# (out, in, how many per step) for the default model, projections fused as the fast path fuses them
SHAPES = [(960, 576, 30), (576, 576, 30), (3072, 576, 30), (576, 1536, 30), (49152, 576, 1)]


def best_time(fn, x, repeat: int) -> float:
    """Returns the best of ``repeat`` calls (after warm-up): on a shared machine the minimum is the steady figure."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return min(times)


def candidates(weight: torch.Tensor) -> dict:
    """Returns name -> (function of x, activation dtype) for one float weight."""
    q8, s8, _ = quantize_groups(weight, 8, 32)
    q4, s4, m4 = quantize_groups(weight, 4, 32)
    c8, c4 = to_columns(q8, s8, None), to_columns(q4, s4, m4)
    out = {
        "float32 F.linear": (lambda x: F.linear(x, weight), torch.float32),
        "columns int8-g32": (torch.compile(lambda x: loop_columns_linear(x, *c8)), torch.float32),
        "columns int4-g32": (torch.compile(lambda x: loop_columns_linear(x, *c4)), torch.float32),
        "loops int8-g32": (torch.compile(lambda x: loop_lanes_linear(x, q8, s8, None)), torch.float32),
        "loops int4-g32": (torch.compile(lambda x: loop_lanes_linear(x, q4, s4, m4)), torch.float32),
        "dequantize int4-g32 + F.linear": (lambda x: F.linear(x, dequantize(q4, s4, m4)), torch.float32),
    }
    # PyTorch's int4 kernel: values as int32 [n, k] -> its packed layout; w = (q - 8) * scale + zero per group
    values = unpack_int4(q4).to(torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        for dtype in (torch.float32, torch.bfloat16):
            zero = s4.float() * 8 + m4.float()
            scale_zero = torch.stack([s4.float(), zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
            out[f"int4pack {str(dtype)[6:]}"] = (
                lambda x, sz=scale_zero: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz),
                dtype,
            )
    except RuntimeError as e:
        print(f"_weight_int4pack_mm_for_cpu unavailable: {e}", file=sys.stderr)
    qc = torch.round(weight / (weight.abs().amax(1, keepdim=True) / 127)).to(torch.int8)
    sc = (weight.abs().amax(1) / 127).to(torch.bfloat16)
    out["int8pack per channel (bf16)"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, qc, sc), torch.bfloat16)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    totals: dict[tuple[str, int], float] = {}
    errors: dict[str, float] = {}
    for out_features, in_features, count in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.05
        for name, (fn, dtype) in candidates(weight).items():
            for rows in [int(r) for r in args.rows.split(",")]:
                if name.startswith("loops") and rows > 1:
                    continue  # one row only (the block layout's loops grow long with every row)
                x = torch.randn(rows, in_features).to(dtype)
                with torch.inference_mode():
                    t = best_time(fn, x, args.repeat)
                    if rows == 1 and "int4" in name:
                        reference = F.linear(x.float(), dequantize(*quantize_groups(weight, 4, 32)))
                        err = (fn(x).float() - reference).abs().max().item() / reference.abs().max().item()
                        errors[name] = max(errors.get(name, 0.0), err)
                totals[(name, rows)] = totals.get((name, rows), 0.0) + count * t
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"All linears of one default-model decode step, {args.threads} threads, best of {args.repeat} calls:\n")
    print(
        "| kernel | "
        + " | ".join(f"{r} row{'s' * (r > 1)} (ms)" for r in rows_list)
        + " | max rel. error vs int4 dequantized |"
    )
    print("|---|" + "---|" * len(rows_list) + "---|")
    for name in dict.fromkeys(n for n, _ in totals):
        cells = [f"{1000 * totals[(name, r)]:.2f}" if (name, r) in totals else "—" for r in rows_list]
        err = f"{errors[name]:.1e}" if name in errors else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {err} |")


if __name__ == "__main__":
    main()
