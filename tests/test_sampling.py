"""llama_gen.sampling against Hugging Face's own logits warpers and Meta's sample_top_p."""

import math
import re

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llama_gen.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_next_token,
    sample_top_p,
    top_k_filter,
    top_p_filter,
)

BATCH, VOCAB = 4, 1000
NEG_INF = float("-inf")


def _logits(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, VOCAB, generator=g) * 3
    if kind == "ties":  # integer-valued logits: many exact ties at every cut-off
        x = x.round()
    elif kind == "peaked":  # one dominant token per row
        x[torch.arange(BATCH), torch.randint(VOCAB, (BATCH,), generator=g)] += 20
    elif kind == "masked":  # some entries already -inf, as after an earlier filter
        x = x.masked_fill(torch.rand(BATCH, VOCAB, generator=g) < 0.5, NEG_INF)
    return x


KINDS = ["randn", "ties", "peaked", "masked"]


def _hf(warper, logits: torch.Tensor) -> torch.Tensor:
    dummy_ids = torch.zeros(logits.size(0), 1, dtype=torch.long)
    return warper(dummy_ids, logits.clone())


def _assert_same_filter(ours: torch.Tensor, ref: torch.Tensor) -> None:
    removed = ref == NEG_INF
    assert torch.equal(ours == NEG_INF, removed), "different set of -inf positions"
    torch.testing.assert_close(ours[~removed], ref[~removed])
    assert (~removed).any(dim=-1).all(), "every row must keep at least one token"


def _unchanged(fn, logits: torch.Tensor, *args) -> torch.Tensor:
    before = logits.clone()
    out = fn(logits, *args)
    assert torch.equal(logits, before), f"{fn.__name__} modified its input"
    return out


# ---- filters vs Hugging Face ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(kind, t):
    x = _logits(kind)
    _assert_same_filter(_unchanged(apply_temperature, x, t), _hf(TemperatureLogitsWarper(t), x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 5, 50, 999, 1000, 5000])
def test_top_k_matches_hf(kind, k):
    x = _logits(kind)
    ours = _unchanged(top_k_filter, x, k)
    _assert_same_filter(ours, _hf(TopKLogitsWarper(k), x))
    if k == 1 and kind in ("randn", "peaked"):
        assert torch.equal((ours != NEG_INF).sum(-1), torch.ones(BATCH, dtype=torch.long))


def test_top_k_zero_is_identity():
    x = _logits("randn")
    assert torch.equal(top_k_filter(x, 0), x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1e-8, 0.01, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_hf(kind, p):
    x = _logits(kind)
    ours = _unchanged(top_p_filter, x, p)
    _assert_same_filter(ours, _hf(TopPLogitsWarper(p), x))
    kept = (ours != NEG_INF).sum(-1)
    if p == 1e-8 and kind != "ties":
        assert torch.equal(kept, torch.ones(BATCH, dtype=torch.long))
    if p == 1.0:
        assert torch.equal(ours, x)
    if kind == "randn" and 0.5 <= p < 1:
        assert (kept < VOCAB).all() and (kept > 1).any(), "case should cut the vocab, not trivially"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [0.0, 0.01, 0.05, 0.1, 0.5, 0.9, 0.999])
def test_min_p_matches_hf(kind, m):
    x = _logits(kind)
    ours = _unchanged(min_p_filter, x, m)
    _assert_same_filter(ours, _hf(MinPLogitsWarper(m), x))
    if kind == "randn" and m in (0.05, 0.5):
        kept = (ours != NEG_INF).sum(-1)
        assert (kept >= 1).all() and (kept < VOCAB).all()


@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_top_p_exact_boundary_matches_hf(kind):
    # p chosen so that a cumulative sum equals 1 - p exactly: HF removes that token (<=)
    x = _logits(kind)
    cum = torch.sort(x, dim=-1).values.softmax(-1).cumsum(-1)
    for i in (VOCAB - 2, VOCAB - 3, VOCAB - 10):
        p = 1 - cum[0, i].item()
        assert torch.tensor(1 - p) == cum[0, i]
        _assert_same_filter(top_p_filter(x, p), _hf(TopPLogitsWarper(p), x))


@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_min_p_exact_boundary_matches_hf(kind):
    # min_p chosen so that min_p * max_prob equals some token's prob exactly: HF keeps it (<)
    x = _logits(kind)
    probs = x.softmax(-1)
    top = probs[0].max()
    hits = 0
    for j in probs[0].argsort(descending=True)[1:30]:
        m = (probs[0, j] / top).item()
        if 0 < m < 1 and m * top == probs[0, j]:
            hits += 1
            _assert_same_filter(min_p_filter(x, m), _hf(MinPLogitsWarper(m), x))
    assert hits > 0


def test_filters_keep_dtype_and_shape():
    x = _logits("randn").bfloat16()
    for out in (top_k_filter(x, 10), top_p_filter(x, 0.9), min_p_filter(x, 0.1)):
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert apply_temperature(x, 0.7).dtype == torch.bfloat16


# ---- repetition penalty -----------------------------------------------------


def _padded_ids(pad_id: int, left: bool, seed: int = 1):
    """[BATCH, 12] ids with duplicates and per-row lengths 12, 7, 1, 0; plus the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 1, 0]
    low = 1 if pad_id == 0 else 0  # with pad 0, a real token 0 is indistinguishable from padding
    rows, ids = [], torch.full((BATCH, 12), pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(low, 40, (n,), generator=g)  # small range -> many repeats
        rows.append(row)
        if n:
            if left:
                ids[b, 12 - n :] = row
            else:
                ids[b, :n] = row
    return ids, rows


@pytest.mark.parametrize("pad_id", [-1, 0, 999])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_hf_on_unpadded_rows(pad_id, left, penalty):
    x = _logits("randn")
    ids, rows = _padded_ids(pad_id, left)
    ours = _unchanged(apply_repetition_penalty, x, ids, penalty, pad_id)
    for b, row in enumerate(rows):
        if len(row) == 0:
            ref = x[b : b + 1]
        else:
            ref = RepetitionPenaltyLogitsProcessor(penalty)(row[None], x[b : b + 1].clone())
        torch.testing.assert_close(ours[b : b + 1], ref, rtol=0, atol=0)
    if penalty != 1.0:
        assert not torch.equal(ours[0], x[0])
        seen = torch.zeros(VOCAB, dtype=torch.bool)
        seen[rows[0]] = True
        assert torch.equal(ours[0] != x[0], seen), "exactly the seen tokens change"


def test_repetition_penalty_unpadded_batch_and_int32_ids():
    x = _logits("randn")
    ids = torch.randint(0, VOCAB, (BATCH, 30), generator=torch.Generator().manual_seed(3))
    ref = RepetitionPenaltyLogitsProcessor(1.5)(ids, x.clone())
    torch.testing.assert_close(apply_repetition_penalty(x, ids.int(), 1.5, -1), ref, rtol=0, atol=0)


def test_repetition_penalty_ignores_ids_past_vocab_like_hf():
    x = _logits("randn")
    ids = torch.tensor([[3, VOCAB + 5, 3, 7]] * BATCH)
    ref = RepetitionPenaltyLogitsProcessor(1.2)(ids, x.clone())
    torch.testing.assert_close(apply_repetition_penalty(x, ids, 1.2, -1), ref, rtol=0, atol=0)


def test_repetition_penalty_bad_token_ids():
    x = _logits("randn")
    with pytest.raises(ValueError, match="token_ids"):
        apply_repetition_penalty(x, torch.zeros(VOCAB, dtype=torch.long), 1.2, -1)
    with pytest.raises(ValueError, match="token_ids"):
        apply_repetition_penalty(x, torch.zeros(BATCH + 1, 3, dtype=torch.long), 1.2, -1)
    with pytest.raises(ValueError, match="integer"):
        apply_repetition_penalty(x, torch.zeros(BATCH, 3), 1.2, -1)


# ---- validation -------------------------------------------------------------

BAD_PARAMS = [
    ("temperature", -0.1, r">= 0"),
    ("temperature", math.nan, r">= 0"),
    ("temperature", math.inf, r">= 0"),
    ("top_p", 0.0, r"\(0, 1\]"),
    ("top_p", -0.5, r"\(0, 1\]"),
    ("top_p", 1.01, r"\(0, 1\]"),
    ("top_p", math.nan, r"\(0, 1\]"),
    ("top_k", -1, r">= 0"),
    ("top_k", 2.5, r"integer"),
    ("top_k", True, r"integer"),
    ("min_p", -0.01, r"\[0, 1\)"),
    ("min_p", 1.0, r"\[0, 1\)"),
    ("min_p", math.nan, r"\[0, 1\)"),
    ("repetition_penalty", 0.0, r"> 0"),
    ("repetition_penalty", -1.0, r"> 0"),
    ("repetition_penalty", math.inf, r"> 0"),
    ("repetition_penalty", math.nan, r"> 0"),
]


@pytest.mark.parametrize("field,value,valid_range", BAD_PARAMS)
def test_sampling_params_rejects_bad_field(field, value, valid_range):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert msg.startswith(field) and repr(value) in msg
    assert re.search(valid_range, msg), "message should state the valid range"


def test_sampling_params_edges_are_valid():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0).validate()
    SamplingParams(temperature=2, top_p=1e-9, top_k=1, min_p=0.999, repetition_penalty=0.01)


def test_functions_reject_bad_scalars():
    x = _logits("randn")
    ids = torch.zeros(BATCH, 2, dtype=torch.long)
    bad_calls = [
        (lambda: apply_temperature(x, 0.0), "temperature"),
        (lambda: apply_temperature(x, -1.0), "temperature"),
        (lambda: top_k_filter(x, -3), "top_k"),
        (lambda: top_p_filter(x, 0.0), "top_p"),
        (lambda: top_p_filter(x, 1.5), "top_p"),
        (lambda: min_p_filter(x, 1.0), "min_p"),
        (lambda: apply_repetition_penalty(x, ids, 0.0, -1), "repetition_penalty"),
        (lambda: sample_top_p(x.softmax(-1), 0.0), "top_p"),
        (lambda: sample_next_token(x[0], SamplingParams()), "logits"),
    ]
    for call, field in bad_calls:
        with pytest.raises(ValueError, match=field):
            call()


# ---- sampling ---------------------------------------------------------------


def test_greedy_is_argmax():
    x = _logits("randn")
    params = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    out = sample_next_token(x, params, generator=torch.Generator().manual_seed(0))
    assert out.shape == (BATCH,) and out.dtype == torch.long
    assert torch.equal(out, x.argmax(-1))


def test_greedy_sees_repetition_penalty():
    x = torch.zeros(BATCH, VOCAB)
    x[:, 10], x[:, 20] = 5.0, 4.5
    ids = torch.tensor([[10, -1], [-1, -1], [10, 10], [20, 10]])
    params = SamplingParams(temperature=0, repetition_penalty=1.2)
    out = sample_next_token(x, params, ids, pad_id=-1)
    assert out.tolist() == [20, 10, 20, 10]
    assert torch.equal(sample_next_token(x, SamplingParams(temperature=0)), x.argmax(-1))


def _hf_chain(x, p: SamplingParams, ids=None):
    if ids is not None and p.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x.clone())
    warpers = [TemperatureLogitsWarper(p.temperature)]
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
    warpers += [MinPLogitsWarper(p.min_p)] if p.min_p else []
    for w in warpers:
        x = _hf(w, x)
    return x


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_p=1.0),
        SamplingParams(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repetition_penalty=1.3),
        SamplingParams(temperature=1.5, top_p=0.5, min_p=0.5, repetition_penalty=0.7),
        SamplingParams(temperature=0.7, top_k=1),
    ],
)
def test_sample_next_token_matches_hf_chain_and_seed(params):
    x = _logits("randn")
    ids = torch.randint(0, VOCAB, (BATCH, 50), generator=torch.Generator().manual_seed(5))
    probs = _hf_chain(x, params, ids).softmax(-1)
    for seed in range(5):
        ours = sample_next_token(x, params, ids, generator=torch.Generator().manual_seed(seed))
        ref = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(ours, ref)
        assert (probs.gather(-1, ours[:, None]) > 0).all(), "sampled a filtered token"


def test_same_seed_same_tokens_different_seed_different_tokens():
    x = _logits("randn") / 3  # flat-ish: collisions across seeds are practically impossible
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def draws(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample_next_token(x, params, generator=g) for _ in range(50)])

    a, b, c = draws(1234), draws(1234), draws(4321)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(a.unique()) > 20, "draws from one generator should vary across steps"


def test_sample_frequencies_follow_filtered_probs():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(20000, 4)
    params = SamplingParams(temperature=1.0, top_p=0.75)
    out = sample_next_token(logits, params, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out, minlength=4).float() / out.numel()
    # nucleus 0.75 keeps {0.5, 0.3} (HF rule), renormalized to {0.625, 0.375}
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)


def _meta_sample_top_p(probs, p):
    # Verbatim from meta-llama/llama llama/generation.py
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    next_token = torch.gather(probs_idx, -1, next_token)
    return next_token


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["randn", "peaked", "ties"])
def test_sample_top_p_matches_meta_reference(p, kind):
    probs = torch.softmax(_logits(kind) / 0.6, dim=-1)
    torch.manual_seed(7)
    ref = torch.cat([_meta_sample_top_p(probs, p) for _ in range(20)], dim=-1)
    g = torch.Generator().manual_seed(7)
    ours = torch.cat([_unchanged(sample_top_p, probs, p, g) for _ in range(20)], dim=-1)
    assert ours.shape == (BATCH, 20) and ours.dtype == torch.long
    assert torch.equal(ours, ref)
    torch.manual_seed(7)  # generator=None draws from the global RNG, like the reference
    assert torch.equal(torch.cat([sample_top_p(probs, p) for _ in range(20)], dim=-1), ref)


# ---- torch.compile ----------------------------------------------------------


def test_filters_and_sampler_trace_without_graph_breaks():
    def chain(logits, ids):
        logits = apply_repetition_penalty(logits, ids, 1.2, -1)
        logits = top_p_filter(top_k_filter(apply_temperature(logits, 0.7), 50), 0.9)
        return min_p_filter(logits, 0.05)

    def sample(logits, ids):
        return sample_next_token(logits, SamplingParams(top_k=50, repetition_penalty=1.2), ids)

    x = _logits("randn")
    ids = torch.randint(-1, VOCAB, (BATCH, 9), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(chain, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, ids), chain(x, ids), rtol=0, atol=0)
    torch.manual_seed(0)
    got = torch.compile(sample, fullgraph=True, backend="eager")(x, ids)
    torch.manual_seed(0)
    assert torch.equal(got, sample(x, ids))
