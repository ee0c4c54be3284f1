"""Quantized checkpoints: written by ``llama-gen quantize`` (or imported from a GGUF file's blocks by
llama_gen.convert), loaded by ``Llama.build`` like any other.

The directory is a checkpoint directory whose ``params.json`` records ``"quantization"``: the scheme in its per-kind
form (llama_gen.fast.quantize.parse_scheme). In ``consolidated.00.pth`` (loadable with ``weights_only=True``) a
group-wise layer ``NAME`` has ``NAME.qweight``, ``NAME.scales`` and, for int4, ``NAME.mins`` (llama_gen.fast.groupwise)
instead of ``NAME.weight``; an output layer tied to the embedding shares its tensors (stored once). Loading
(``load_quantized``, reached from llama_gen.checkpoint.load_model through a lazy hook) builds the quantized layers
on the memory-mapped tensors, as they are.
"""

import json
import shutil
from pathlib import Path

import torch

from llama_gen.checkpoint import load_model, read_params
from llama_gen.fast.groupwise import QuantEmbedding, QuantLinear, quantized_tensors
from llama_gen.fast.layout import int8_kernels
from llama_gen.fast.quantize import kind_modules, model_scheme, parse_scheme, quantize_grouped, share_tied_output
from llama_gen.model import Transformer
from llama_gen.tokenizer import load_tokenizer

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_quantized(
    model: Transformer,
    state: dict[str, torch.Tensor],
    scheme: str,
    device: torch.device,
    dtype: torch.dtype,
    where: Path,
) -> None:
    """Replaces the model's (meta-device) layers that ``state`` holds quantized by quantized layers on those tensors,
    taking them out of ``state`` (what stays is loaded as usual); raises ValueError naming ``where`` (the checkpoint)
    when the tensors don't fit the model or the scheme is unknown."""
    try:
        parse_scheme(scheme)
    except ValueError as e:
        raise ValueError(f"{where}: params.json records an unknown quantization: {e}") from None
    loop_rows = int8_kernels().loop_rows
    shared: dict[tuple, torch.Tensor] = {}  # a tied output layer's tensors: the embedding's, as one tensor object
    for _, name, module in list(kind_modules(model)):
        if f"{name}.qweight" not in state:
            continue
        tensors = [state.pop(f"{name}.{suffix}", None) for suffix in ("qweight", "scales", "mins")]
        for t in tensors:
            if t is not None and (t.data_ptr(), t.dtype, t.shape) not in shared:
                shared[(t.data_ptr(), t.dtype, t.shape)] = t.to(device)
        q, scales, mins = (None if t is None else shared[(t.data_ptr(), t.dtype, t.shape)] for t in tensors)
        out_features, in_features = module.weight.shape
        bits = 8 if mins is None else 4
        groups = scales.shape[1] if scales is not None and scales.dim() == 2 else 0
        if (
            scales is None
            or q.dtype != (torch.int8 if bits == 8 else torch.uint8)
            or tuple(q.shape) != (out_features, in_features * bits // 8)
            or groups == 0
            or in_features % groups
            or (in_features // groups) % 32  # whole llama.cpp blocks of 32
            or tuple(scales.shape) != (out_features, groups)
            or (mins is not None and mins.shape != scales.shape)
        ):
            raise ValueError(
                f"{where}: the quantized tensors of {name} (qweight {_shape(q)}, scales {_shape(scales)}, mins "
                f"{_shape(mins)}) don't fit its shape [{out_features}, {in_features}]: the checkpoint is damaged"
            )
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        if isinstance(module, torch.nn.Embedding):
            setattr(parent, attr, QuantEmbedding(q, scales, mins, dtype))
        else:
            setattr(parent, attr, QuantLinear(q, scales, mins, loop_rows))


def _shape(t: torch.Tensor | None) -> str:
    return "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def quantized_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Returns the checkpoint tensors of a quantized (unfused) model: the quantized layers' and the float ones."""
    state = {}
    for _, name, module in kind_modules(model):
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            state.update({f"{name}.{suffix}": t for suffix, t in quantized_tensors(module).items()})
    return {**state, **model.state_dict()}


def write_quantized(model: Transformer, src: Path, out_dir: Path) -> Path:
    """Writes a quantized model as a checkpoint directory (params.json from ``src`` plus its scheme, the other
    files copied from ``src``); returns out_dir."""
    scheme = model_scheme(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(quantized_state(model), out_dir / "consolidated.00.pth")
    params = json.loads((src / "params.json").read_text())
    (out_dir / "params.json").write_text(json.dumps({**params, "quantization": scheme}, indent=2) + "\n")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
    return out_dir


def quantize_checkpoint(src: str | Path, out_dir: str | Path, scheme: str, tokenizer_path: str | None = None) -> Path:
    """Quantizes a float checkpoint directory with a group-wise scheme into out_dir; returns out_dir."""
    if scheme == "int8":
        raise ValueError("int8 (per channel) is applied at load time only; write a group-wise one (int8-g32, ...)")
    specs = parse_scheme(scheme)
    src, out_dir = Path(src).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: give a new directory")
    if "quantization" in read_params(src):
        raise ValueError(f"{src} is already quantized: quantize a float checkpoint")
    tokenizer = load_tokenizer(tokenizer_path or src)
    model = load_model(src, tokenizer, torch.device("cpu"), torch.float32, max_seq_len=2, max_batch_size=1)
    quantize_grouped(model, specs, loop_rows=0)
    share_tied_output(model)
    return write_quantized(model, src, out_dir)
