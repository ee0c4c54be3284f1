"""A hand-written Llama Transformer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache."""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama_gen import parallel


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 params.json flag: rope scaling with Meta's fixed factors
    # Llama 3.1 rope scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    qkv_bias: bool = False  # biases on wq, wk, wv (Qwen2); none costs nothing

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: dict[str, Any], **runtime: Any) -> "ModelArgs":
        """Returns ModelArgs from a Meta ``params.json`` dict (unknown keys ignored) plus run-time fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**params, **runtime}.items() if k in known})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Returns the SwiGLU hidden size, computed exactly as Meta's reference does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def rope_scaling_factors(self) -> dict | None:
        """Returns the Llama 3.1 rope scaling factors in use, or None."""
        if self.rope_scaling:
            return self.rope_scaling
        if self.use_scaled_rope:
            return dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def scale_rope_frequencies(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Returns inverse frequencies rescaled the Llama 3.1 way (long wavelengths slowed, short ones kept)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > old_context / low, freqs / factor, blended)
    return torch.where(wavelen < old_context / high, freqs, scaled)


def precompute_rope(head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Returns a ``[max_len, head_dim // 2, 2]`` float32 table of (cos, sin) for each position and frequency."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling:
        freqs = scale_rope_frequencies(freqs, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of ``x [b, s, h, d]`` by ``rope [s, d/2, 2]`` (or ``[b, s, d/2, 2]``:
    each row at its own positions); returns x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope.unsqueeze(-3).unbind(-1)  # [(b,) s, 1, d/2]: the same angle for every head
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = parallel.model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.head_dim = args.head_dim
        self.wq = parallel.column_linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = parallel.column_linear(args.dim, args.kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = parallel.column_linear(args.dim, args.kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = parallel.row_linear(args.n_heads * self.head_dim, args.dim)
        self.wqkv: nn.Module | None = None  # wq, wk, wv as one matmul, set by fast.fuse_projections
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def setup_cache(self, max_batch_size: int, positions: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (max_batch_size, positions, self.n_local_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns q ``[b, s, heads, hd]`` and k, v ``[b, s, kv_heads, hd]`` for x ``[b, s, dim]``, q and k rotated."""
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None:
            q_size, kv_size = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor, mask: torch.Tensor | None, rows: slice):
        """Attends x's tokens (at start_pos...) over the cache rows ``rows``, after writing their keys and values."""
        bsz, seqlen, _ = x.shape
        q, k, v = self.project(x, rope)

        end = start_pos + seqlen
        self.cache_k[rows, start_pos:end] = k
        self.cache_v[rows, start_pos:end] = v
        keys = self.cache_k[rows, :end].transpose(1, 2)
        values = self.cache_v[rows, :end].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=self.n_local_heads != self.n_local_kv_heads
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = parallel.column_linear(dim, hidden_dim)
        self.w2 = parallel.row_linear(hidden_dim, dim)
        self.w3 = parallel.column_linear(dim, hidden_dim)
        self.w13: nn.Module | None = None  # w1 and w3 as one matmul, set by fast.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor, mask: torch.Tensor | None, rows: slice):
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = parallel.embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = parallel.column_linear(args.dim, args.vocab_size, gather_output=True)
        self.rope: torch.Tensor | None = None

    def setup_caches(self, max_batch_size: int | None = None, max_seq_len: int | None = None) -> None:
        """Allocates the KV caches and the rotary table on the weights' device and dtype (args' sizes by default)."""
        args = self.args
        args.max_batch_size = max_batch_size or args.max_batch_size
        args.max_seq_len = max_seq_len or args.max_seq_len
        weight = self.norm.weight
        for layer in self.layers:  # free any old caches first: the new ones then reuse their memory
            layer.attention.cache_k = layer.attention.cache_v = None
        for layer in self.layers:
            layer.attention.setup_cache(args.max_batch_size, args.max_seq_len, weight.device, weight.dtype)
        self.rope = self.rope_table()

    def rope_table(self) -> torch.Tensor:
        """Returns the rotary (cos, sin) table for positions 0..max_seq_len-1 on the weights' device."""
        args = self.args
        rope = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling_factors())
        return rope.to(self.norm.weight.device)

    def ensure_caches(self) -> None:
        """Allocates the KV caches and rotary table (setup_caches, sized by args) unless they already exist."""
        if self.rope is None:
            self.setup_caches()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False, first_row: int = 0):
        """Returns float32 logits ``[batch, seqlen, vocab]`` for ``tokens`` placed at positions start_pos...

        The KV cache is filled for those positions, so decoding continues with ``start_pos + seqlen``. With
        ``last_only`` only the last position's logits are computed (``[batch, 1, vocab]``): all a sampler needs.
        The sequences use the cache rows from ``first_row`` on (a serving engine keeps each in its own row).
        """
        self.ensure_caches()
        bsz, seqlen = tokens.shape
        if start_pos + seqlen > self.args.max_seq_len or first_row + bsz > self.args.max_batch_size:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} at start_pos={start_pos}, row {first_row} exceed the cache "
                f"(max_batch_size={self.args.max_batch_size}, max_seq_len={self.args.max_seq_len})"
            )
        h = self.tok_embeddings(tokens)
        rope = self.rope[start_pos : start_pos + seqlen]
        mask = None
        if seqlen > 1:
            # Causal over the new tokens; every cached position before start_pos is visible.
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device).tril(start_pos)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask, slice(first_row, first_row + bsz))
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
