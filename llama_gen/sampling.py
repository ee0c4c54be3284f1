"""Next-token sampling: small pure functions on [batch, vocab] logits.

Each filter returns a new tensor with removed entries set to -inf, matches the corresponding Hugging Face logits warper,
and branches only on Python scalars (never on tensor values), so the chain traces under torch.compile without host
syncs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 -> greedy
    top_p: float = 0.9  # (0, 1]; 1 disables
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # [0, 1); 0 disables
    repetition_penalty: float = 1.0  # > 0; 1 disables (HF / CTRL semantics)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Return None; raise ValueError naming the first field outside its valid range."""
        for field in dataclasses.fields(self):
            _check(field.name, getattr(self, field.name))


# field -> (is the value valid, what a valid value is); a valid value is also a real number, never a bool
RULES = {
    "temperature": (lambda t: 0 <= t < math.inf, "a finite number >= 0 (0 means greedy)"),
    "top_p": (lambda p: 0 < p <= 1, "in (0, 1] (1 disables nucleus filtering)"),
    "top_k": (lambda k: isinstance(k, numbers.Integral) and k >= 0, "an integer >= 0 (0 disables top-k filtering)"),
    "min_p": (lambda m: 0 <= m < 1, "in [0, 1) (0 disables min-p filtering)"),
    "repetition_penalty": (lambda r: 0 < r < math.inf, "a finite number > 0 (1 disables the penalty)"),
    "positive temperature": (lambda t: 0 < t < math.inf, "a finite number > 0 (for temperature 0 take the argmax)"),
}


def _check(name: str, value: object) -> None:
    valid, expected = RULES[name]
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and valid(value)):
        raise ValueError(f"{name.split()[-1]} must be {expected}, got {value!r}")


def apply_temperature(logits: Tensor, temperature: float, check: bool = True) -> Tensor:
    """Return logits / temperature (temperature must be > 0)."""
    if check:
        _check("positive temperature", temperature)
    return logits / temperature


def top_k_filter(logits: Tensor, k: int, check: bool = True) -> Tensor:
    """Return logits with everything below the k-th largest value per row set to -inf.

    Ties with the k-th value are kept (as in HF TopKLogitsWarper); k=0 or k>=vocab returns the logits unchanged.
    """
    if check:
        _check("top_k", k)
    if k == 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, int(k), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float, check: bool = True) -> Tensor:
    """Return logits with tokens outside the nucleus of mass p set to -inf.

    Same rule as HF TopPLogitsWarper(min_tokens_to_keep=1): walking up from the least likely token, drop tokens while
    their cumulative probability is <= 1 - p; the most likely token is always kept. p=1 returns the logits unchanged.
    """
    if check:
        _check("top_p", p)
    if p == 1:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    # fp32 so a bf16 cumsum doesn't cut the nucleus at the wrong place
    cum_probs = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cum_probs <= 1 - p
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float, check: bool = True) -> Tensor:
    """Return logits with tokens whose probability is < min_p * max probability set to -inf.

    Same rule as HF MinPLogitsWarper(min_tokens_to_keep=1); min_p=0 returns the logits unchanged.
    """
    if check:
        _check("min_p", min_p)
    if min_p == 0:
        return logits
    probs = logits.float().softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    # min_p < 1, so the top token always survives: no explicit keep-one step needed.
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_repetition_penalty(
    logits: Tensor, token_ids: Tensor, penalty: float, pad_id: int, check: bool = True
) -> Tensor:
    """Return logits with every token seen in the row's token_ids penalized once.

    logits: [batch, vocab]; token_ids: [batch, seq] of prompt + generated ids, padded with pad_id (any value, e.g. -1 or
    0), which is ignored. Penalized scores are score * penalty if score < 0 else score / penalty (HF
    RepetitionPenaltyLogitsProcessor). Ids outside [0, vocab) are ignored, like HF ignores ids past the logits' vocab.
    """
    if check:
        _check("repetition_penalty", penalty)
        _check_token_ids(logits, token_ids)
    if penalty == 1:
        return logits
    vocab = logits.size(-1)
    token_ids = token_ids.to(device=logits.device, dtype=torch.long)
    valid = (token_ids != pad_id) & (token_ids >= 0) & (token_ids < vocab)
    # Padding (and any out-of-range id) is scattered into a throwaway column `vocab`,
    # so pad_id=-1 never becomes an index.
    ids = torch.where(valid, token_ids, vocab)
    seen = torch.zeros(logits.size(0), vocab + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter(1, ids, True)[:, :vocab]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _check_token_ids(logits: Tensor, token_ids: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if token_ids.dim() != 2 or token_ids.size(0) != logits.size(0):
        raise ValueError(
            f"token_ids must be [batch, seq] with batch={logits.size(0)} to match logits, "
            f"got shape {tuple(token_ids.shape)}"
        )
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")


def sample_top_p(probs: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Return [batch, 1] token ids drawn from probs restricted to the top-p nucleus.

    Meta's llama reference algorithm: sort descending, keep each token whose preceding
    mass is <= p, renormalize, draw with torch.multinomial.
    """
    _check("top_p", p)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill(probs_sum - probs_sort > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample_next_token(
    logits: Tensor, params: SamplingParams, token_ids: Tensor | None = None, pad_id: int = -1,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Return [batch] int64 next-token ids sampled from [batch, vocab] logits.

    Order: repetition penalty (if != 1 and token_ids given) -> argmax if temperature is 0 -> temperature -> top_k ->
    top_p -> min_p -> softmax (fp32) -> multinomial. generator (on logits' device) makes draws reproducible per call.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if params.repetition_penalty != 1 and token_ids is not None:
        logits = apply_repetition_penalty(logits, token_ids, params.repetition_penalty, pad_id, check=False)
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    # params were validated when they were made: no filter re-checks its value on every step
    logits = apply_temperature(logits, params.temperature, check=False)
    logits = top_k_filter(logits, params.top_k, check=False)
    logits = top_p_filter(logits, params.top_p, check=False)
    logits = min_p_filter(logits, params.min_p, check=False)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
