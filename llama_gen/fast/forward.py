"""FastForward: a drop-in for ``model.forward`` that runs prompts eagerly and single tokens through the decode step.

Prompts (several tokens) run through the eager ``Transformer.forward`` in chunks; every single-token step runs
through llama_gen.fast.step.decode_step, optionally compiled: on CPU built ahead of time in a child process
(llama_gen.fast.aot), else with ``torch.compile`` in this process, which is also the fallback when the ahead-of-
time build fails.
"""

import gc
import time
import warnings
from collections.abc import Callable

import torch

from llama_gen.checkpoint import release_freed_memory
from llama_gen.fast.aot import AotBuildError, AotStep
from llama_gen.fast.layout import Layout
from llama_gen.fast.step import attention_window, causal_mask, decode_step
from llama_gen.model import Transformer

PREFILL_ROWS = 1024  # prompt tokens (all sequences together) run at once; more only add temporaries


def free_compiler_memory() -> None:
    """Collects garbage (the compiler's, replaced modules) and hands the freed memory back to the OS (it can be
    100s of MB)."""
    gc.collect()
    release_freed_memory()


def default_compile_mode(device: torch.device) -> str | None:
    """CUDA graphs ("reduce-overhead") on GPU; inductor's default mode elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


class FastForward:
    """Drop-in for ``model.forward(tokens, start_pos)``: prompts run eagerly, single tokens via decode_step.

    With ``compile=True`` the decode step is compiled with ``torch.compile(fullgraph=True)`` on first use: one
    graph per batch size (the window is a dynamic dimension; a window of the whole cache gets its own graph),
    or with CUDA graphs one per batch size and static window; given ``aot_layout`` (CPU: the Layout the model was
    prepared with, for the child process that rebuilds its structure) it is instead built ahead of time by
    llama_gen.fast.aot, one package per batch size. ``compile_seconds`` records those first calls (compilation
    plus one step) apart from steady-state decoding.
    """

    def __init__(
        self,
        model: Transformer,
        compile: bool = True,
        mode: str | None = None,
        options: dict | None = None,
        aot_layout: Layout | None = None,
    ):
        self.model = model
        device = model.norm.weight.device
        self.mask = causal_mask(model.args.max_seq_len, device)
        self.positions = torch.arange(model.args.max_seq_len, device=device)
        self.compiled = compile
        self.step: Callable[..., torch.Tensor] = decode_step
        self.cuda_graphs = False
        use_aot = compile and aot_layout is not None
        self.aot = AotStep(model, self.mask, aot_layout) if use_aot else None  # (sizes the caches)
        model.ensure_caches()
        if self.aot is not None:
            self.step = self.aot
        elif compile:
            self.step = self.torch_compiled_step(mode, options)
        self.compile_seconds: dict[tuple[int, int], float] = {}  # graph_key(batch size, window) -> first call

    def torch_compiled_step(self, mode: str | None, options: dict | None) -> Callable[..., torch.Tensor]:
        """Returns decode_step compiled with ``torch.compile`` in this process (CUDA graphs by default on GPU)."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = mode or default_compile_mode(self.mask.device)
        self.cuda_graphs = mode == "reduce-overhead"
        return torch.compile(
            decode_step, fullgraph=True, dynamic=False, mode=mode, options=options if mode is None else None
        )

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """Returns float32 logits ``[b, seqlen, vocab]`` (``[b, 1, vocab]`` with last_only), like model.forward."""
        bsz, seqlen = tokens.shape
        args = self.model.args
        if start_pos + seqlen > args.max_seq_len or bsz > args.max_batch_size:
            return self.model.forward(tokens, start_pos, last_only=last_only)  # (its error message)
        if seqlen > 1:
            return self.prefill(tokens, start_pos, last_only)
        return self._decode(tokens, self.positions[start_pos].expand(bsz), self.window(start_pos))

    def prefill(self, tokens: torch.Tensor, start_pos: int, last_only: bool) -> torch.Tensor:
        """Returns model.forward's logits for a prompt, run eagerly in chunks of about PREFILL_ROWS tokens in all.

        A batch of long prompts in one piece holds every layer's activations for all its tokens at once (~120
        MiB of temporaries for 8 x 512 tokens on the default model, a quarter of its weights and cache); the
        chunks attend to the cache the earlier ones filled, as decoding does.
        """
        bsz, seqlen = tokens.shape
        chunk = max(1, PREFILL_ROWS // bsz)
        logits = [
            self.model.forward(tokens[:, start : start + chunk], start_pos + start, last_only=last_only)
            for start in range(0, seqlen, chunk)
        ]
        return logits[-1] if last_only else torch.cat(logits, dim=1)

    @property
    def static_windows(self) -> bool:
        """CUDA graphs record every shape separately: their windows are a few static sizes, not a dynamic one."""
        return self.cuda_graphs

    def window(self, pos: int) -> int:
        """Returns the attention window a step at ``pos`` uses."""
        return attention_window(pos, self.model.args.max_seq_len, static=self.static_windows)

    def graph_key(self, bsz: int, window: int) -> tuple[int, int]:
        """Returns (batch size, window) for a static window, else (batch size, 0) for the dynamic-window graph;
        a window of the whole cache is always its own graph (the compiler specializes the whole cache's layout)."""
        if self.aot is not None:
            return (bsz, 0)  # one package per batch size, every window included
        return (bsz, window) if self.static_windows or window == self.model.args.max_seq_len else (bsz, 0)

    @torch.inference_mode()
    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
        """Returns float32 logits ``[b, 1, vocab]`` for tokens ``[b, 1]``, row i at position ``positions[i]``,
        attending over the first ``window`` cache positions (from attention_window of the largest position that
        matters; a row whose position lies beyond it is a placeholder whose output nobody reads)."""
        return self._decode(tokens, positions, window)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
        # Fresh device tensors, with the same strides every call: the compiled step is specialized on strides, and
        # a column of generate's token matrix (or an expanded position) has strides that change (it would
        # recompile). A device tensor of positions: no recompilation per position either.
        input_pos = torch.empty(positions.shape, dtype=positions.dtype, device=positions.device).copy_(positions)
        tokens = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device).copy_(tokens)
        mask_columns = self.mask[:, :window]
        if self.compiled and not self.static_windows and self.aot is None:
            torch._dynamo.maybe_mark_dynamic(mask_columns, 1)
        key = self.graph_key(tokens.shape[0], window)
        first = self.compiled and key not in self.compile_seconds
        start = time.perf_counter()
        try:
            logits = self.step(self.model, tokens, input_pos, mask_columns)
        except AotBuildError as error:  # nothing lost: compile in this process instead
            warnings.warn(f"{error}\nCompiling the decode step in-process with torch.compile instead.", stacklevel=2)
            self.aot, self.step = None, self.torch_compiled_step(None, None)
            return self._decode(tokens, positions, window)
        if first:
            self.compile_seconds[key] = time.perf_counter() - start
            free_compiler_memory()
        return logits.clone() if self.cuda_graphs else logits  # CUDA graphs reuse their output buffer

    @torch.inference_mode()
    def warm_up(self, batch_sizes: tuple[int, ...] = (1,), max_pos: int | None = None) -> float:
        """Compiles the decode step for these batch sizes and every graph up to max_pos needs; returns seconds.

        Writes only cache position 0, which every generation overwrites with its first prompt token.
        """
        if not self.compiled:
            return 0.0
        start = time.perf_counter()
        max_seq_len = self.model.args.max_seq_len
        last = max_seq_len - 1 if max_pos is None else min(max_pos, max_seq_len - 1)
        windows = sorted({self.window(pos) for pos in range(last + 1)})
        for bsz in batch_sizes:
            tokens = torch.zeros(bsz, 1, dtype=torch.long, device=self.positions.device)
            for window in windows:
                if self.graph_key(bsz, window) not in self.compile_seconds:
                    # position 0, attending over `window` positions
                    self._decode(tokens, self.positions[:1].expand(bsz), window)
        return time.perf_counter() - start
