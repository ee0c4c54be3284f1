"""The fast decoding path: fused projections and a static-shape decode step that ``torch.compile`` takes whole.

The eager ``Transformer.forward`` stays the reference. This module only adds:

* ``fuse_projections``: wq/wk/wv -> one ``wqkv`` matmul and w1/w3 -> one ``w13`` matmul, done after the
  checkpoint is loaded (the checkpoint format does not change).
* ``decode_step``: one new token per sequence at a position given as a tensor. The KV cache is written with
  ``index_put_`` and attention runs over a window of the cache (the first ``window`` positions) with a mask row
  taken from a precomputed causal mask, so the step compiles to a single graph (gpt-fast style). On CPU the
  window is pos + 1 rounded up to 16 and a dynamic dimension of that one graph; with CUDA graphs, whose every
  shape is recorded separately, windows are powers of two and each is a static graph.
* ``FastForward``: a drop-in for ``model.forward`` that runs the prompt (several tokens) eagerly and every
  single-token step through the (optionally compiled) ``decode_step``: on CPU built ahead of time in a child
  process (llama_gen.fast.aot), else with ``torch.compile``.
"""

import gc
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from llama_gen.fast.aot import AotBuildError, AotStep, aot_enabled
from llama_gen.fast.cpu import has_native_bf16_matmul, mkl_gemv_is_fastest
from llama_gen.fast.gemv import MAX_ROWS, NATIVE_BF16_MAX_ROWS, use_gemv_linears
from llama_gen.fast.memory import move_to_huge_pages, release_freed_memory, release_pages
from llama_gen.fast.packed import pack_linears
from llama_gen.fast.quantize import Int8Linear
from llama_gen.fast.quantize import quantize as quantize_model
from llama_gen.model import Attention, Transformer

MIN_WINDOW = 64  # static windows (CUDA graphs): powers of two from this up to max_seq_len
WINDOW_STEP = 16  # dynamic windows (otherwise): multiples of this
PREFILL_ROWS = 1024  # prompt tokens (all sequences together) run at once; more only add temporaries


# ---- fused projections ---------------------------------------------------------------------------------


def fused_linear(parts: list[nn.Module]) -> nn.Module:
    """Returns one bias-free linear layer computing ``torch.cat([p(x) for p in parts], -1)``."""
    if all(isinstance(p, Int8Linear) for p in parts):
        return Int8Linear.concat(parts)
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    for p in parts:
        release_pages(p.weight)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def can_fuse(model: Transformer) -> bool:
    """Fusion needs plain (or int8) linear layers, not fairscale's model-parallel ones."""
    attn = model.layers[0].attention
    plain = (nn.Linear, Int8Linear)
    return attn.wqkv is not None or all(type(getattr(attn, name)) in plain for name in ("wq", "wk", "wv"))


def fuse_projections(model: Transformer) -> Transformer:
    """Replaces wq/wk/wv by ``wqkv`` and w1/w3 by ``w13`` in every layer (in place); returns the model."""
    if not can_fuse(model):
        raise ValueError("projection fusion needs plain nn.Linear layers (model_parallel_size=1)")
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        if attn.wqkv is None:
            attn.wqkv = fused_linear([attn.wq, attn.wk, attn.wv])
            del attn.wq, attn.wk, attn.wv
        if ff.w13 is None:
            ff.w13 = fused_linear([ff.w1, ff.w3])
            del ff.w1, ff.w3
        release_freed_memory()  # this layer's unfused weights, before the next layer's fused copies
    return model


# ---- the static-shape decode step ----------------------------------------------------------------------


def causal_mask(max_seq_len: int, device: torch.device) -> torch.Tensor:
    """Returns the ``[max_seq_len, max_seq_len]`` bool mask: row p lets position p see positions <= p."""
    return torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()


def attention_window(pos: int, max_seq_len: int, static: bool = False) -> int:
    """Returns how many cache positions a step at ``pos`` attends over (at most max_seq_len).

    Dynamic windows: pos + 1 rounded up to a multiple of WINDOW_STEP, so a step reads little more of the cache
    than it uses. Static windows (each one its own graph): a power of two >= pos + 1, from MIN_WINDOW, so a
    few graphs cover every position.
    """
    if not static:
        return min(-(-(pos + 1) // WINDOW_STEP) * WINDOW_STEP, max_seq_len)
    window = MIN_WINDOW
    while window < pos + 1:
        window *= 2
    return min(window, max_seq_len)


def attention_step(
    attn: Attention, x: torch.Tensor, input_pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, window: int
) -> torch.Tensor:
    """Attention for one new token per sequence (x ``[b, 1, dim]``) at position ``input_pos`` ``[1]``."""
    bsz = x.shape[0]
    q, k, v = attn.project(x, rope)
    # Index the whole cache (not a [:bsz] view) so the compiled write stays in place rather than copying the cache.
    where = (torch.arange(bsz, device=x.device)[:, None], input_pos[None, :])
    attn.cache_k.index_put_(where, k)
    attn.cache_v.index_put_(where, v)
    out = attend_one(q, attn.cache_k[:bsz, :window], attn.cache_v[:bsz, :window], mask)
    return attn.wo(out)


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of one query per sequence; returns ``[b, 1, heads * hd]`` in q's dtype.

    q ``[b, 1, heads, hd]``; keys, values ``[b, window, kv_heads, hd]`` (the cache's own layout); mask
    ``[1, window]`` bool. Query head i reads KV head i // (heads / kv_heads), as in Meta's repeat_kv. Written as
    broadcast products and sums (float32) that the compiler fuses into loops reading the cache in place; for a
    single query this is faster than the flash-attention kernel.
    """
    bsz, _, n_heads, head_dim = q.shape
    n_kv = keys.shape[2]
    grouped = q.view(bsz, 1, n_kv, n_heads // n_kv, head_dim).float()  # query heads grouped by their KV head
    scores = (grouped * keys[:, :, :, None, :].float()).sum(-1) * head_dim**-0.5  # [b, window, kv, group]
    probs = scores.masked_fill(~mask.view(1, -1, 1, 1), float("-inf")).softmax(dim=1)
    out = (probs[..., None] * values[:, :, :, None, :].float()).sum(1)  # [b, kv, group, hd]
    return out.reshape(bsz, 1, n_heads * head_dim).type_as(q)


def decode_step(
    model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, mask_columns: torch.Tensor
) -> torch.Tensor:
    """Returns float32 logits ``[b, 1, vocab]`` for tokens ``[b, 1]`` at position ``input_pos`` ``[1]``.

    ``mask_columns`` is the causal mask's first ``window`` columns (``[max_seq_len, window]``): its width is the
    attention window, its row ``input_pos`` the mask.
    """
    window = mask_columns.shape[1]
    h = model.tok_embeddings(tokens)
    rope = model.rope[input_pos]
    mask_row = mask_columns[input_pos]
    for layer in model.layers:
        h = h + attention_step(layer.attention, layer.attention_norm(h), input_pos, rope, mask_row, window)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()


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
    or with CUDA graphs one per batch size and static window; with ``aot`` (CPU) it is instead built ahead of
    time by llama_gen.fast.aot, one package per batch size (``quantize`` and ``layout`` say how the model was
    prepared, for the child process that rebuilds its structure). ``compile_seconds`` records those first calls
    (compilation plus one step) apart from steady-state decoding.
    """

    def __init__(
        self,
        model: Transformer,
        compile: bool = True,
        mode: str | None = None,
        options: dict | None = None,
        aot: bool = False,
        quantize: str | None = None,
        layout: str = "plain",
    ):
        self.model = model
        device = model.norm.weight.device
        self.mask = causal_mask(model.args.max_seq_len, device)
        self.positions = torch.arange(model.args.max_seq_len, device=device)
        self.compiled = compile
        self.step: Callable[..., torch.Tensor] = decode_step
        self.cuda_graphs = False
        self.aot = AotStep(model, self.mask, quantize, layout) if compile and aot else None  # sizes the caches
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
        return self._decode(tokens, start_pos, self.window(start_pos))

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

    def _decode(self, tokens: torch.Tensor, pos: int, window: int) -> torch.Tensor:
        input_pos = self.positions[pos : pos + 1].clone()  # a device tensor: no recompilation per position
        # A fresh [b, 1] copy: a column of generate's token matrix has a stride that changes with the
        # generation's length, and the compiled step is specialized on strides (it would recompile).
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
            return self._decode(tokens, pos, window)
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
                    self._decode(tokens, 0, window)  # position 0, attending over `window` positions
        return time.perf_counter() - start


def cpu_weight_layout(model: Transformer) -> str:
    """How the compiled fast path keeps this model's weights: "packed" (oneDNN-packed, llama_gen.fast.packed), "gemv"
    (plain, compiled into Inductor's own loops, llama_gen.fast.gemv) or "plain" (library kernels).

    One layout is chosen at load time, from the dtype, the largest batch and the CPU (llama_gen.fast.cpu), as
    measured (benchmarks/RESULTS.md). bf16 where the CPU has native bf16 matmuls: gemv up to
    gemv.NATIVE_BF16_MAX_ROWS rows, packed for larger batches (oneDNN's kernel on plain weights repacks each
    weight on every call); without them, gemv. float32 on Intel CPUs stays plain at batch 1 (MKL's
    matrix-vector kernel beats the packed one by ~25%) and is packed for batches; elsewhere it is gemv up to
    gemv.MAX_ROWS rows (1 row: ~2x MKL's generic path, ~1.6x packed; 8 rows: ~1.3x packed) and packed beyond.
    """
    dtype = model.norm.weight.dtype
    if model.norm.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return "plain"
    if dtype == torch.bfloat16:
        return "packed" if has_native_bf16_matmul() and model.args.max_batch_size > NATIVE_BF16_MAX_ROWS else "gemv"
    if mkl_gemv_is_fastest():
        return "packed" if model.args.max_batch_size > 1 else "plain"
    return "gemv" if model.args.max_batch_size <= MAX_ROWS else "packed"


def apply_layout(model: Transformer, quantize: str | None, layout: str) -> None:
    """Applies the load-time weight changes in place: int8 weights (each float weight's pages dropped as it is
    replaced), fused projections, then the CPU weight layout ("packed", "gemv" or "plain")."""
    quantize_model(model, quantize)
    fuse_projections(model)
    if layout == "packed":
        pack_linears(model, batch_size=model.args.max_batch_size)
    elif layout == "gemv":
        use_gemv_linears(model)


def uses_aot(model: Transformer) -> bool:
    """True when the compiled step is built ahead of time (llama_gen.fast.aot): on CPU, unless ``LLAMA_GEN_AOT=0``."""
    return model.norm.weight.device.type == "cpu" and aot_enabled()


def prepare(model: Transformer, compile: bool = False, quantize: str | None = None) -> FastForward | None:
    """Applies the load-time speed-ups in place and returns the forward to decode with (None: plain eager).

    Without model parallel: apply_layout with cpu_weight_layout's choice (with ``compile``; on CPU the weights
    then move onto huge pages, llama_gen.fast.memory.move_to_huge_pages), then the static-shape decode step,
    compiled on first use with ``compile``: ahead of time in a child process on CPU (llama_gen.fast.aot), else
    ``torch.compile``.
    """
    if not (compile or quantize):
        return None
    if not can_fuse(model):  # model parallel: fairscale's layers and collectives stay eager
        quantize_model(model, quantize)  # (refuses, with its reason)
        return FastForward(model, compile=False)
    layout = cpu_weight_layout(model) if compile else "plain"
    apply_layout(model, quantize, layout)
    if compile and model.norm.weight.device.type == "cpu":
        move_to_huge_pages(model)
    fast = FastForward(model, compile=compile, aot=compile and uses_aot(model), quantize=quantize, layout=layout)
    free_compiler_memory()  # the replaced layers, before the first prompt (bf16 b8 peak 591 vs 604 MiB without)
    return fast
