"""The static-shape decode step: one new token per sequence, in a form ``torch.compile`` takes whole.

The eager ``Transformer.forward`` stays the reference. ``decode_step`` runs one token per sequence at a
position given as a tensor: the KV cache is written with ``index_put_`` and attention runs over a window of the
cache (the first ``window`` positions) with a mask row taken from a precomputed causal mask, so the step
compiles to a single graph (gpt-fast style). On CPU the window is pos + 1 rounded up to 16 and a dynamic
dimension of that one graph; with CUDA graphs, whose every shape is recorded separately, windows are powers of
two and each is a static graph. llama_gen.fast.forward runs it; llama_gen.fast.aot builds it ahead of time.
"""

import torch

from llama_gen.model import Attention, Transformer

MIN_WINDOW = 64  # static windows (CUDA graphs): powers of two from this up to max_seq_len
WINDOW_STEP = 16  # dynamic windows (otherwise): multiples of this


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
