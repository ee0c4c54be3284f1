"""The static-shape decode step: one new token per sequence, in a form ``torch.compile`` takes whole.

The eager ``Transformer.forward`` stays the reference. ``decode_step`` runs one token per sequence, each at its
own position given in a tensor (the padded loop passes one position for every row; the serving engine, each row's
own): the KV cache is written with ``index_put_`` and attention runs over a window of the
cache (the first ``window`` positions) with a mask row taken from a precomputed causal mask, so the step
compiles to a single graph (gpt-fast style). On CPU the window is pos + 1 rounded up to 16 and a dynamic
dimension of that one graph; with CUDA graphs, whose every shape is recorded separately, windows are powers of
two and each is a static graph. llama_gen.fast.forward runs it; llama_gen.fast.aot builds it ahead of time.
"""

import torch
import torch.nn.functional as F

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
    """Attention for one new token per sequence (x ``[b, 1, dim]``), row i at position ``input_pos[i]``."""
    bsz = x.shape[0]
    q, k, v = attn.project(x, rope)
    # Index the whole cache (not a [:bsz] view) so the compiled write stays in place rather than copying the cache.
    where = (torch.arange(bsz, device=x.device)[:, None], input_pos[:, None])
    attn.cache_k.index_put_(where, k)
    attn.cache_v.index_put_(where, v)
    out = attend_one(q, attn.cache_k[:bsz, :window], attn.cache_v[:bsz, :window], mask)
    return attn.wo(out)


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of one query per sequence; returns ``[b, 1, heads * hd]`` in q's dtype.

    q ``[b, 1, heads, hd]``; keys, values ``[b, window, kv_heads, hd]`` (the cache's own layout); mask
    ``[b, window]`` bool (each row's own). Query head i reads KV head i // (heads / kv_heads), as in Meta's
    repeat_kv. Compiled, it is written as broadcast products and sums (float32) that the compiler fuses into loops
    reading the cache in place (for a single query faster than the flash-attention kernel); run eagerly, those
    would materialize [b, window, heads, hd] temporaries, so it calls PyTorch's attention kernel instead.
    """
    bsz, _, n_heads, head_dim = q.shape
    n_kv = keys.shape[2]
    if not torch.compiler.is_compiling():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None, None, :],
            enable_gqa=n_heads != n_kv,
        )  # fmt: skip
        return out.transpose(1, 2).reshape(bsz, 1, n_heads * head_dim)
    grouped = q.view(bsz, 1, n_kv, n_heads // n_kv, head_dim).float()  # query heads grouped by their KV head
    scores = (grouped * keys[:, :, :, None, :].float()).sum(-1) * head_dim**-0.5  # [b, window, kv, group]
    probs = scores.masked_fill(~mask.view(bsz, -1, 1, 1), float("-inf")).softmax(dim=1)
    out = (probs[..., None] * values[:, :, :, None, :].float()).sum(1)  # [b, kv, group, hd]
    return out.reshape(bsz, 1, n_heads * head_dim).type_as(q)


def decode_step(
    model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, mask_columns: torch.Tensor
) -> torch.Tensor:
    """Returns float32 logits ``[b, 1, vocab]`` for tokens ``[b, 1]``, row i at position ``input_pos[i]`` (``[b]``).

    ``mask_columns`` is the causal mask's first ``window`` columns (``[max_seq_len, window]``): its width is the
    attention window (every row's position must be inside it), its row ``input_pos[i]`` row i's mask.
    """
    window = mask_columns.shape[1]
    h = model.tok_embeddings(tokens)
    rope = model.rope[input_pos][:, None]  # [b, 1, hd / 2, 2]: each row rotated for its own position
    mask_row = mask_columns[input_pos]
    for layer in model.layers:
        h = h + attention_step(layer.attention, layer.attention_norm(h), input_pos, rope, mask_row, window)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()
