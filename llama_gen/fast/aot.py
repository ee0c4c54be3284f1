"""The decode step compiled ahead of time (AOTInductor) in a child process, for CPU.

``torch.compile`` compiles in the generating process: importing the compiler costs ~120 MiB of resident
memory (as much as the default model's int8 weights), compiling costs more, and every step then pays
Python-side dispatch between its ~250 kernels (2-3 ms of a ~10 ms int8 step on the default model). Here the
step (llama_gen.fast.step.decode_step, unchanged) is exported with ``torch.export`` and compiled by AOTInductor
into a shared library, in a child process; the generating process loads it with PyTorch's C++ loader, without
importing the compiler, and hands it its own weights, KV cache and masks as user-managed constants (no copy),
so one call runs the whole step in C++.

Packages are cached on disk (``$LLAMA_GEN_CACHE``, default ``~/.cache/llama_gen/aot``) under a key of all
the compiled code depends on: model shape, dtype, the layout (llama_gen.fast.layout.Layout: quantization, weight
layout, kernels), batch size, PyTorch version, CPU capability and this package's source. One package per batch
size; the attention window is a dynamic dimension of each. The child builds a model of the same structure with
placeholder weights and applies the same Layout, decided by the parent: the compiled code depends on shapes,
dtypes, layouts and kernels only.
"""

import dataclasses
import hashlib
import json
import operator
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llama_gen.checkpoint import release_freed_memory
from llama_gen.fast.cpu import cpuinfo_field
from llama_gen.fast.layout import Layout, apply_layout
from llama_gen.fast.step import causal_mask, decode_step
from llama_gen.model import ModelArgs, Transformer

# What the compiled code is made of (relative to the llama_gen package): the model and the whole fast path.
PACKAGE_SOURCES = ("model.py", "fast/*.py")


def cache_dir() -> Path:
    """Returns the folder AOT packages are kept in (``$LLAMA_GEN_CACHE`` or ``~/.cache/llama_gen/aot``)."""
    root = os.environ.get("LLAMA_GEN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "llama_gen"
    return Path(root).expanduser() / "aot"


def source_digest() -> str:
    """Returns a digest of the package sources the compiled step is made of (a change invalidates packages)."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # the llama_gen package
    for path in sorted(p for pattern in PACKAGE_SOURCES for p in root.glob(pattern)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def step_spec(model: Transformer, batch_size: int, layout: Layout) -> dict:
    """Returns the JSON-able description a child process rebuilds the model's structure from."""
    return {
        "args": dataclasses.asdict(model.args),
        "dtype": str(model.norm.weight.dtype).removeprefix("torch."),
        "layout": layout.to_json(),
        "batch_size": batch_size,
        "shared_table": shares_table(model),
    }


def shares_table(model: Transformer) -> bool:
    """True when the token embedding reads tensors of the output layer (a tied model's one table)."""
    output = {t.data_ptr() for t in [*model.output.parameters(), *model.output.buffers()]}
    embedding = [*model.tok_embeddings.parameters(), *model.tok_embeddings.buffers()]
    return any(t.data_ptr() in output for t in embedding)


def package_path(spec: dict) -> Path:
    """Returns where the package for this spec lives, keyed by everything its compiled code depends on."""
    cpu = [torch.backends.cpu.get_cpu_capability(), cpuinfo_field("flags")]  # the compiled code uses the CPU's ISA
    key = json.dumps({**spec, "torch": torch.__version__, "cpu": cpu, "source": source_digest()}, sort_keys=True)
    return cache_dir() / f"decode_step-b{spec['batch_size']}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2"


class AotBuildError(RuntimeError):
    """The child process could not build a package (the caller can compile in-process instead)."""


class StepModule(nn.Module):
    """decode_step as a module to export: the KV cache, rotary table and causal mask become its buffers.

    The attention window (a dynamic dimension) is passed as the length of ``window_probe``, a tensor whose
    contents are never read, because AOTInductor packages take tensors only.
    """

    def __init__(self, model: Transformer, mask: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask, persistent=False)
        as_buffer(model, "rope")
        for layer in model.layers:
            as_buffer(layer.attention, "cache_k")
            as_buffer(layer.attention, "cache_v")

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, window_probe: torch.Tensor) -> torch.Tensor:
        return decode_step(self.model, tokens, input_pos, self.mask[:, : window_probe.shape[0]])


def as_buffer(module: nn.Module, name: str) -> None:
    """Re-registers the plain tensor attribute ``name`` of module as a non-persistent buffer (same tensor)."""
    tensor = getattr(module, name)
    delattr(module, name)
    module.register_buffer(name, tensor, persistent=False)


# A window of the whole cache would be the whole tensor, a case the exporter specializes (and so refuses a window
# dimension that reaches max_seq_len): the cache gets a spare position, never used, so that no window is.
SPARE_CACHE_POSITIONS = 1


def setup_padded_caches(model: Transformer) -> None:
    """Allocates the model's KV caches with SPARE_CACHE_POSITIONS unused positions past max_seq_len (and its
    rotary table), freeing any old caches first so the new ones can reuse their memory."""
    args, weight = model.args, model.norm.weight
    for layer in model.layers:
        layer.attention.cache_k = layer.attention.cache_v = None
    release_freed_memory()
    for layer in model.layers:
        layer.attention.setup_cache(
            args.max_batch_size, args.max_seq_len + SPARE_CACHE_POSITIONS, weight.device, weight.dtype
        )
    model.rope = model.rope_table()


def skeleton(spec: dict) -> Transformer:
    """Returns a model with the spec's structure (placeholder weights, its Layout applied)."""
    args = ModelArgs(**spec["args"])
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(getattr(torch, spec["dtype"])).to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # placeholder values (quantizing uninitialized memory would warn about NaNs)
        if not spec["shared_table"]:
            # quantizing ties an output layer equal to the embedding (share_tied_output): tie them here only when
            # the parent's are, or the step would read the embedding from the output layer's tensors
            model.output.weight.fill_(1)
    setup_padded_caches(model)
    apply_layout(model, Layout.from_json(spec["layout"]))
    return model


def build_package(spec: dict, path: Path) -> None:
    """Exports the decode step of a spec-shaped model and compiles it into an AOTInductor package at path."""
    import torch._inductor  # here, not at the top: only the child process that builds ever imports the compiler
    from torch.export import Dim, export

    model = skeleton(spec)
    args = model.args
    step = StepModule(model, causal_mask(args.max_seq_len, torch.device("cpu")))
    tokens = torch.zeros(spec["batch_size"], 1, dtype=torch.long)
    example = (tokens, torch.zeros(spec["batch_size"], dtype=torch.long), torch.empty(min(64, args.max_seq_len)))
    window = Dim("window", min=2, max=args.max_seq_len)
    with torch.no_grad():
        program = export(
            step, example, dynamic_shapes={"tokens": None, "input_pos": None, "window_probe": {0: window}}, strict=True
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial-{os.getpid()}.pt2")
        # Constants stay the caller's tensors: none is stored in the package, and none is inlined into the code
        # (Inductor would otherwise inline one-element tensors, such as packed.PackedLinear's handle, by value).
        configs = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=configs)
    partial.replace(path)  # atomic: a concurrent or interrupted build never leaves a half-written package


def ensure_package(spec: dict, on_start: Callable[[subprocess.Popen], None] | None = None) -> Path:
    """Returns the package for spec, built first if it is not cached.

    A missing package is built by a child process (``python -m llama_gen.fast.aot``), so the compiler's memory
    and imports never enter this one; ``on_start`` receives that process (to stop it early, say).
    """
    path = package_path(spec)
    if path.exists():
        return path
    print(
        f"compiling the decode step ahead of time (batch {spec['batch_size']}, once; cached in {path.parent}) ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "llama_gen.fast.aot", json.dumps(spec), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if on_start is not None:
        on_start(child)
    output, _ = child.communicate()
    if child.returncode != 0 or not path.exists():
        raise AotBuildError(
            f"building the decode step ahead of time failed (exit {child.returncode}); its output "
            f"ends:\n{output[-2000:]}"
        )
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child's, so far
    print(
        f"compiled the decode step in {seconds:.1f} s (compiler process peak {peak_mib:.0f} MiB)",
        file=sys.stderr,
        flush=True,
    )
    return path


class AotStep:
    """Runs a model's decode step from AOTInductor packages, one per batch size, built or loaded on first use.

    Called like decode_step: ``step(model, tokens, input_pos, mask_columns)`` returns float32 logits
    ``[b, 1, vocab]``; it must be this object's model and mask, the model prepared with ``layout``.
    """

    def __init__(self, model: Transformer, mask: torch.Tensor, layout: Layout):
        setup_padded_caches(model)
        self.model = model
        self.mask = mask
        self.layout = layout
        self.probe = torch.empty(model.args.max_seq_len, device=mask.device)
        self.loaders: dict[int, torch._C._aoti.AOTIModelPackageLoader] = {}

    def loader(self, batch_size: int) -> "torch._C._aoti.AOTIModelPackageLoader":
        """Returns the loaded package for this batch size, its constants bound to this model's tensors."""
        if batch_size not in self.loaders:
            path = ensure_package(step_spec(self.model, batch_size, self.layout))
            loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
            owner = {"model": self.model, "mask": self.mask}
            constants = {name: resolve(owner, name) for name in loader.get_constant_fqns()}
            loader.load_constants(constants, False, True, True)  # user-managed: the package uses these tensors
            self.loaders[batch_size] = loader
        return self.loaders[batch_size]

    def __call__(
        self, model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, mask_columns: torch.Tensor
    ) -> torch.Tensor:
        window_probe = self.probe[: mask_columns.shape[1]]
        return self.loader(tokens.shape[0]).run([tokens, input_pos, window_probe])[0]


def resolve(owner: dict, fqn: str) -> torch.Tensor:
    """Returns the tensor a package constant names (``model.layers.0.attention.cache_k``, ``mask``, ...)."""
    root, _, rest = fqn.partition(".")
    return operator.attrgetter(rest)(owner[root]) if rest else owner[root]


def uses_aot(model: Transformer) -> bool:
    """True when the compiled step is built ahead of time here: on CPU, unless ``LLAMA_GEN_AOT=0`` asks for
    in-process torch.compile instead."""
    return model.norm.weight.device.type == "cpu" and os.environ.get("LLAMA_GEN_AOT", "1") != "0"


if __name__ == "__main__":
    build_package(json.loads(sys.argv[1]), Path(sys.argv[2]))
