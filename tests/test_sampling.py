"""Sampling controls and acceptance rules: hand-checked processing, and convergence of the real
acceptance code to the target distribution (first, second and third emitted tokens).

Convergence tests (in the style of vLLM's tests/samplers/test_rejection_sampler.py): the target is
a Markov chain over a small vocabulary, p(x_t | x_{t-1}) = TRANS[x_{t-1}], and the drafts are
synthetic. N rows run whole speculative decoding loops (several verify cycles each) as one batch
through `trimode.sampling`, each row using position-keyed uniforms exactly as the decoders do (the
draft uniform of a token is reused when that token is redrafted in a later cycle). The empirical
law of the first three emitted tokens is compared with the chain's by Pearson chi-square: token 1
against p, token 2 given token 1, token 3 given tokens 1-2 (cells with expected count < 5 pooled).
Seeded, so deterministic. Threshold: a correct rule passes with p-value >= ALPHA = 1e-3; the
negative controls (rejection applied to a confidence-ordered draft, the case `resolve_rule`
refuses; and a draft whose recorded q is not what it was drawn from) must fail with p-value < 1e-8,
which shows the test can see a lossy rule.
"""

from __future__ import annotations

import pytest
import torch

from trimode.bench.chi2 import chi2_goodness_of_fit, chi2_sf, chi2_two_sample
from trimode.sampling import (
    N_STREAMS,
    U_DRAFT,
    BatchParams,
    RowRandom,
    SamplingParams,
    accept,
    accept_match,
    accept_rejection,
    process_logits,
    resolve_rule,
    sample,
    uniforms_at,
)

ALPHA = 1e-3
V = 6
N_ROWS = 30_000
N_DRAFT = 3  # drafts per cycle: every cycle emits 1..4 tokens


# --- SamplingParams ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": "1"},
    {"top_k": -1}, {"top_k": 2.5}, {"top_k": True}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1},
    {"min_p": 1.1}, {"seed": -1}, {"seed": 1.0}, {"seed": 2**63}, {"acceptance": "typical"},
])
def test_bad_params_raise_value_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_resolve_rule():
    assert resolve_rule(None, independent_draft=True) == "greedy"
    assert resolve_rule(SamplingParams(temperature=0, acceptance="rejection"), independent_draft=True) == "greedy"
    assert resolve_rule(SamplingParams(acceptance="auto"), independent_draft=True) == "rejection"
    assert resolve_rule(SamplingParams(acceptance="auto"), independent_draft=False) == "match"
    assert resolve_rule(SamplingParams(acceptance="rejection"), independent_draft=False) == "match"
    assert resolve_rule(SamplingParams(acceptance="match"), independent_draft=True) == "match"


# --- processing -------------------------------------------------------------------------------


def _bp(**kw) -> BatchParams:
    return BatchParams.of([SamplingParams(**kw)])


LOGITS = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()


def test_temperature_is_softmax_of_scaled_logits():
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = process_logits(x, BatchParams.of([SamplingParams(temperature=0.5), SamplingParams(temperature=2.0)]))
    assert torch.allclose(got[0], (x[0] / 0.5).softmax(-1))
    assert torch.allclose(got[1], (x[1] / 2.0).softmax(-1))


@pytest.mark.parametrize("kw, want", [
    ({}, [0.5, 0.3, 0.15, 0.05]),
    ({"top_k": 2}, [0.625, 0.375, 0, 0]),
    ({"top_k": 1}, [1, 0, 0, 0]),
    ({"top_k": 9}, [0.5, 0.3, 0.15, 0.05]),
    ({"top_p": 0.79}, [0.625, 0.375, 0, 0]),  # 0.5 + 0.3 reaches 0.79: the nucleus stops there
    ({"top_p": 0.81}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    ({"top_p": 0.01}, [1, 0, 0, 0]),  # the most likely token is always kept
    ({"min_p": 0.2}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # keep p >= 0.1
    ({"min_p": 0.7}, [1, 0, 0, 0]),
    ({"top_k": 3, "top_p": 0.8}, [0.625, 0.375, 0, 0]),  # top-p on the top-k renormalised mass
    ({"top_k": 3, "top_p": 0.85}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # 0.8/0.95 < 0.85
    ({"temperature": 0}, [1, 0, 0, 0]),
])
def test_filters_by_hand(kw, want):
    got = process_logits(LOGITS[None], _bp(**kw))[0]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12), got


def test_rows_use_their_own_params_and_mask_stays_zero():
    x = LOGITS.clone()
    x[3] = float("-inf")  # the mask id after exclude_mask
    rows = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(temperature=0), None, SamplingParams(min_p=0.5)]
    got = process_logits(x.expand(5, 2, 4), BatchParams.of(rows))
    assert torch.allclose(got[:, 0], got[:, 1])
    assert torch.allclose(got[0, 0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(got[1, 0], torch.tensor([0.5, 0.3, 0.15, 0], dtype=torch.float64) / 0.95)
    assert torch.equal(got[2, 0], got[3, 0]) and got[3, 0, 0] == 1
    assert torch.allclose(got[4, 0], torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64))
    assert (got[..., 3] == 0).all()


def test_float32_logits_give_float32_probs():
    p = process_logits(LOGITS.float()[None], _bp(top_p=0.9))
    assert p.dtype == torch.float32 and abs(float(p.sum()) - 1) < 1e-6


# --- sampling and per-row randomness ----------------------------------------------------------


def test_inverse_cdf_never_draws_zero_probability_and_matches_p():
    p = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0], dtype=torch.float64)
    u = torch.rand(50_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = sample(p.expand(50_000, 6), u)
    counts = torch.bincount(x, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    stat, df = chi2_goodness_of_fit(counts, p)
    assert chi2_sf(stat, df) >= ALPHA
    assert sample(p[None], torch.zeros(1, dtype=torch.float64)).item() == 1
    assert sample(p[None], torch.full((1,), 1 - 1e-16, dtype=torch.float64)).item() == 4


def test_row_random_is_keyed_by_token_index():
    a, b = RowRandom(7), RowRandom(7)
    first = a.at(0, 3).clone()
    later = a.at(3, 100).clone()  # extends the buffer across several fixed-size chunks
    assert torch.equal(torch.cat([first, later]), b.at(0, 103))
    assert torch.equal(a.at(5, 2), b.at(5, 2))
    assert not torch.equal(RowRandom(8).at(0, 3), first)
    assert RowRandom(None).seed != RowRandom(None).seed  # nondeterministic but reported


def test_uniforms_do_not_depend_on_the_batch():
    rngs = [RowRandom(s) for s in (3, 4, 5)]
    batch = uniforms_at([rngs[0], None, rngs[1], rngs[2]], [0, 0, 10, 2], 4)
    assert batch.shape == (4, 4, N_STREAMS) and (batch[1] == 0).all()
    assert torch.equal(batch[2], RowRandom(4).at(10, 4))
    assert torch.equal(batch[3], uniforms_at([RowRandom(5)], [2], 4)[0])


def test_greedy_special_cases_equal_argmax_acceptance():
    g = torch.Generator().manual_seed(3)
    B, n = 64, 5
    logits = torch.randn(B, n + 1, V, generator=g, dtype=torch.float64)
    target = process_logits(logits, _bp(temperature=0).select([0] * B))
    noise = torch.randint(0, V, (B, n), generator=g)
    drafts = torch.where(torch.rand(B, n, generator=g) < 0.7, target[:, :n].argmax(-1), noise)
    ar = target.argmax(-1)
    want = (ar[:, :n] == drafts).long().cumprod(1).sum(1)
    u = torch.rand(B, n + 1, N_STREAMS, generator=g, dtype=torch.float64)
    m = accept_match(drafts, target, u[..., 0])
    q = torch.nn.functional.one_hot(drafts, V).double()  # a greedy draft is a point mass
    r = accept_rejection(drafts, q, target, u[:, :n, 1], u[:, :n, 2], u[..., 0])
    for res in (m, r):
        assert torch.equal(res.accepted, want)
        assert torch.equal(res.tokens.gather(1, want[:, None]), ar.gather(1, want[:, None]))


def test_accept_mixes_rules_per_row():
    g = torch.Generator().manual_seed(4)
    B, n = 32, 3
    p = torch.randn(B, n + 1, V, generator=g).softmax(-1)
    q = torch.randn(B, n, V, generator=g).softmax(-1)
    u = torch.rand(B, n + 1, N_STREAMS, generator=g, dtype=torch.float64)
    d = sample(q, u[:, :n, U_DRAFT])
    flags = torch.arange(B) % 2 == 0
    mixed = accept(d, p, u, q=q, rejection=flags)
    m, r = accept(d, p, u), accept(d, p, u, q=q, rejection=torch.ones(B, dtype=torch.bool))
    assert torch.equal(mixed.accepted[flags], r.accepted[flags])
    assert torch.equal(mixed.accepted[~flags], m.accepted[~flags])
    assert torch.equal(mixed.tokens[flags], r.tokens[flags])


# --- convergence: whole speculative loops on a synthetic Markov target ---------------------------


def _chain(seed: int):
    g = torch.Generator().manual_seed(seed)
    trans = (torch.randn(V, V, generator=g, dtype=torch.float64) * 1.2).softmax(-1)  # target
    qlin = (torch.randn(V, N_DRAFT, V, generator=g, dtype=torch.float64) * 1.2).softmax(-1)  # q[head, slot]
    return trans, qlin


START = 0  # the prompt's last token


def _target_along(trans: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """p[:, i] = TRANS[heads[:, i]]: the target for the token after each canvas/head token."""
    return trans[heads]


def _run(rule: str, draft: str, *, seed: int = 0, n_rows: int = N_ROWS, need: int = 3) -> torch.Tensor:
    """Speculative decoding of `need` tokens per row; returns (n_rows, need) emitted tokens.

    draft: "linear" (one pass: slot i drawn independently from q[head, i]), "quadratic" (every
    verified head d_j proposes the next drafts from its own sub-block, q[d_j, i]; the sub-block of
    the last accepted head is used next cycle), "ordered" (slot 1 is drawn after slot 2 and
    conditioned on it, the recorded q of slot 1 being that conditional: a confidence-ordered draft),
    "mislabelled" (drafts drawn from a sharpened q, but q itself is recorded).
    """
    trans, qlin = _chain(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    L = need + 2 * N_DRAFT + 2
    u_all = torch.rand(n_rows, L, N_STREAMS, generator=g, dtype=torch.float64)  # position-keyed
    out = torch.full((n_rows, L), -1, dtype=torch.long)
    count = torch.zeros(n_rows, dtype=torch.long)
    head = torch.full((n_rows,), START, dtype=torch.long)
    rows = torch.arange(n_rows)
    ar = torch.arange(N_DRAFT + 1)
    carried_d = carried_q = None
    while bool((count < need).any()):
        t0 = count  # the drafts cover tokens t0 .. t0 + n - 1; the verify slots t0 .. t0 + n
        u = u_all[rows[:, None], (t0[:, None] + ar[None, :]).clamp(max=L - 1)]  # (B, n + 1, S)
        if carried_d is not None:
            drafts, q = carried_d, carried_q
        elif draft in ("linear", "quadratic"):
            q = qlin[head]  # (B, n, V)
            drafts = sample(q, u[:, :N_DRAFT, U_DRAFT])
        elif draft == "mislabelled":
            q = qlin[head]
            drafts = sample((q ** 3) / (q ** 3).sum(-1, keepdim=True), u[:, :N_DRAFT, U_DRAFT])
        else:  # ordered: slot 2 first, then slot 1 leaning towards slot 2's token
            q = qlin[head].clone()
            drafts = sample(q, u[:, :N_DRAFT, U_DRAFT])
            lean = 0.2 * q[:, 0] + 0.8 * torch.nn.functional.one_hot(drafts[:, 1], V).double()
            q[:, 0] = lean
            drafts[:, 0] = sample(lean, u[:, 0, U_DRAFT])
        heads = torch.cat([head[:, None], drafts], dim=1)  # canvas [head, d_1 .. d_n]
        p = _target_along(trans, heads)  # (B, n + 1, V)
        res = accept(drafts, p, u, q=q, rejection=torch.full((n_rows,), rule == "rejection"))
        k = res.accepted + 1
        pos = (count[:, None] + ar[None, :]).clamp(max=L - 1)
        write = ar[None, :] < k[:, None]
        out[rows[:, None].expand_as(pos)[write], pos[write]] = res.tokens[write]
        count = count + k
        head = res.tokens.gather(1, res.accepted[:, None]).squeeze(1)
        carried_d = carried_q = None
        if draft == "quadratic":
            # Sub-block j drafts tokens t0 + j + 1 .. t0 + j + n from head d_j (q depends on d_j and j;
            # the same token's draft uniform is shared by every sub-block that covers it).
            j = res.accepted  # the last accepted head; the recovered / bonus token follows it
            dj = heads.gather(1, j[:, None]).squeeze(1)
            q2 = qlin[(dj + j + 1) % V]  # (B, n, V)
            nxt = (t0 + j + 1)[:, None] + torch.arange(N_DRAFT)[None, :]
            ud = u_all[rows[:, None], nxt.clamp(max=L - 1), U_DRAFT]
            carried_d, carried_q = sample(q2, ud), q2
    return out[:, :need]


def _pvalues(tokens: torch.Tensor, seed: int = 0) -> list[float]:
    """p-values of token 1 ~ p, token 2 | token 1, token 3 | tokens 1-2 under the chain."""
    trans, _ = _chain(seed)
    pv = []
    for t in range(tokens.shape[1]):
        stat_sum, df_sum = 0.0, 0
        if t == 0:
            groups = [(torch.ones(len(tokens), dtype=torch.bool), trans[START])]
        else:
            prev = tokens[:, :t]
            keys = torch.unique(prev, dim=0)
            groups = [((prev == k).all(1), trans[k[-1]]) for k in keys]
        for sel, probs in groups:
            stat, df = chi2_goodness_of_fit(torch.bincount(tokens[sel, t], minlength=V), probs)
            stat_sum, df_sum = stat_sum + stat, df_sum + df
        pv.append(chi2_sf(stat_sum, df_sum))
    return pv


@pytest.mark.parametrize("rule, draft", [
    ("rejection", "linear"), ("rejection", "quadratic"), ("match", "linear"), ("match", "ordered"),
])
def test_convergence_first_three_tokens(rule, draft):
    tokens = _run(rule, draft)
    assert (tokens >= 0).all()
    pv = _pvalues(tokens)
    assert min(pv) >= ALPHA, pv


@pytest.mark.parametrize("draft", ["ordered", "mislabelled"])
def test_rejection_on_an_invalid_draft_is_detected(draft):
    """Negative controls: the same test flags rejection sampling with a q that is not the draft's
    conditional law. (This is why resolve_rule falls back to match for such drafts.)"""
    pv = _pvalues(_run("rejection", draft))
    assert min(pv) < 1e-8, pv


def test_rejection_accepts_more_than_match():
    """Same drafts, same target: E[accepted] is larger under rejection (sum min(p, q) >= sum p q)."""
    g = torch.Generator().manual_seed(5)
    B, n = 20_000, N_DRAFT
    trans, qlin = _chain(0)
    head = torch.randint(0, V, (B,), generator=g)
    u = torch.rand(B, n + 1, N_STREAMS, generator=g, dtype=torch.float64)
    q = qlin[head]
    d = sample(q, u[:, :n, U_DRAFT])
    p = _target_along(trans, torch.cat([head[:, None], d], 1))
    m = accept(d, p, u).accepted.double().mean()
    r = accept(d, p, u, q=q, rejection=torch.ones(B, dtype=torch.bool)).accepted.double().mean()
    assert r > m + 0.1, (float(m), float(r))


def test_two_sample_statistic():
    g = torch.Generator().manual_seed(6)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    a = torch.bincount(torch.multinomial(p, 5000, replacement=True, generator=g), minlength=4)
    b = torch.bincount(torch.multinomial(p, 4000, replacement=True, generator=g), minlength=4)
    c = torch.bincount(torch.multinomial(torch.tensor([0.3, 0.3, 0.3, 0.1]), 4000, replacement=True, generator=g),
                       minlength=4)
    assert chi2_sf(*chi2_two_sample(a, b)) >= ALPHA
    assert chi2_sf(*chi2_two_sample(a, c)) < 1e-8
    assert abs(chi2_sf(3.841458820694124, 1) - 0.05) < 1e-9  # the textbook 95% point
