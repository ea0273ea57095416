"""Sampling end to end on a tiny random model: speculative modes against AR, seeds against batches.

Two-sample test: N_SAMPLES rows of one prompt decode 3 tokens in `ar` (seeds 0..N-1) and in each
speculative mode and rule (seeds N..2N-1, so the two samples are independent); the joint law of
the 3-token tuples is compared by a chi-square test of homogeneity (cells with an expected count
below 5 pooled). top_k=4 keeps the tuple space at 64 cells so the test has power at this N.
Threshold: p-value >= ALPHA = 1e-3 (seeded, so deterministic); a negative control (rejection
sampling with the classic bug of drawing the recovered token from p instead of the residual) must
score below 1e-6 at the same N (it scores about 1e-7 to 1e-8).
"""

from __future__ import annotations

import pytest
import torch
from _tiny import PROMPTS, StubDrafter, tiny_model

from trimode import generate, sampling
from trimode.bench.chi2 import chi2_sf, chi2_two_sample

ALPHA = 1e-3
N_SAMPLES = 2000
PROMPT = [5, 17, 33, 2]
KW = {"temperature": 0.9, "top_k": 4}


@pytest.fixture(scope="module")
def model():
    return tiny_model(adapter=True)


def _tuples(gens) -> torch.Tensor:
    toks = torch.tensor([g.tokens[:3] for g in gens])
    return toks[:, 0] * 96 * 96 + toks[:, 1] * 96 + toks[:, 2]


def _counts(codes: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    return (codes[:, None] == cats[None, :]).sum(0)


def _pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    cats = torch.unique(torch.cat([a, b]))
    return chi2_sf(*chi2_two_sample(_counts(a, cats), _counts(b, cats)))


@pytest.fixture(scope="module")
def ar_samples(model):
    gens = generate(model, [PROMPT] * N_SAMPLES, mode="ar", max_new_tokens=3, seed=0, **KW)
    return gens


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
@pytest.mark.parametrize("rule", ["match", "rejection"])
def test_first_three_tokens_match_ar_in_distribution(model, ar_samples, mode, rule):
    gens = generate(model, [PROMPT] * N_SAMPLES, mode=mode, max_new_tokens=3, block_len=4,
                    seed=N_SAMPLES, acceptance=rule, **KW)
    assert all(g.stats["acceptance_rule"] == rule for g in gens)
    pv = _pvalue(_tuples(ar_samples), _tuples(gens))
    assert pv >= ALPHA, pv


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_two_sample_test_sees_a_lossy_rule(model, ar_samples, mode, monkeypatch):
    """Power: the classic bug of drawing the recovered token from p instead of the residual
    max(0, p - q) is caught by the same test at the same N."""
    right = sampling.accept_rejection

    def recovered_from_p(drafts, q, p, u_accept, u_residual, u_sample):
        r = right(drafts, q, p, u_accept, u_residual, u_sample)
        n = drafts.shape[1]
        at = r.accepted.clamp(max=n - 1)[:, None]
        wrong = sampling.sample(p[:, :n], u_residual).gather(1, at)
        tokens = r.tokens.scatter(1, at, torch.where(r.recovered[:, None], wrong, r.tokens.gather(1, at)))
        return sampling.Acceptance(r.accepted, tokens, r.recovered)

    monkeypatch.setattr(sampling, "accept_rejection", recovered_from_p)
    gens = generate(model, [PROMPT] * N_SAMPLES, mode=mode, max_new_tokens=3, block_len=4, seed=N_SAMPLES,
                    acceptance="rejection", **KW)
    assert _pvalue(_tuples(ar_samples), _tuples(gens)) < 1e-6


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_match_reproduces_ar_for_the_same_seed(model, mode):
    """Both sample token t from the same distribution with the same uniform: identical outputs."""
    ar = generate(model, PROMPTS, mode="ar", max_new_tokens=20, seed=7, temperature=1.0)
    sp = generate(model, PROMPTS, mode=mode, max_new_tokens=20, block_len=4, seed=7, temperature=1.0,
                  acceptance="match")
    assert [g.tokens for g in sp] == [g.tokens for g in ar]


CASES = [("ar", None), ("diffusion", None), ("linear", "match"), ("linear", "rejection"),
         ("quadratic", "match"), ("quadratic", "rejection")]


@pytest.mark.parametrize("mode, rule", CASES)
def test_same_seed_same_output_at_batch_one_and_in_a_batch(model, mode, rule):
    kw = {"max_new_tokens": 21, "block_len": 4, "temperature": 1.0, "top_p": 0.95, "threshold": 0.3}
    if rule:
        kw["acceptance"] = rule
    seeds = [11, 12, 13, 14]
    batched = generate(model, PROMPTS, mode=mode, seed=seeds, **kw)
    for p, s, g in zip(PROMPTS, seeds, batched):
        assert generate(model, [p], mode=mode, seed=s, **kw)[0].tokens == g.tokens
    # An int seed gives row i the seed + i; rows differ; another seed changes the output.
    assert [g.tokens for g in generate(model, PROMPTS, mode=mode, seed=11, **kw)] == [g.tokens for g in batched]
    again = generate(model, [PROMPTS[0]] * 3, mode=mode, seed=[5, 5, 6], **kw)
    assert again[0].tokens == again[1].tokens != again[2].tokens
    assert all(sum(g.stats["step_tokens"]) == len(g.tokens) for g in batched)


def test_greedy_is_unchanged(model):
    for mode in ("ar", "linear", "quadratic", "diffusion"):
        base = generate(model, PROMPTS, mode=mode, max_new_tokens=12, block_len=4)
        zero = generate(model, PROMPTS, mode=mode, max_new_tokens=12, block_len=4, temperature=0, seed=3)
        assert [g.tokens for g in zero] == [g.tokens for g in base]
        assert [g.nfe for g in zero] == [g.nfe for g in base]


def test_rule_falls_back_to_match_for_overridden_drafts(model):
    ref = [g.tokens for g in generate(model, PROMPTS, mode="ar", max_new_tokens=12)]
    oracle = StubDrafter(ref, vocab=96, mask_id=95)
    for mode in ("linear", "quadratic"):
        gens = generate(model, PROMPTS, mode=mode, max_new_tokens=12, block_len=4, temperature=1.0, seed=0,
                        acceptance="rejection", draft_override=oracle)
        assert {g.stats["acceptance_rule"] for g in gens} == {"match"}
        assert all(g.stats["acceptance_requested"] == "rejection" for g in gens)
        auto = generate(model, PROMPTS, mode=mode, max_new_tokens=12, block_len=4, temperature=1.0, seed=0)
        assert {g.stats["acceptance_rule"] for g in auto} == {"rejection"}


def test_rejection_accepts_more_than_match(model):
    acc = {}
    for rule in ("match", "rejection"):
        gens = generate(model, PROMPTS * 8, mode="linear", max_new_tokens=24, block_len=4, temperature=0.7,
                        seed=0, acceptance=rule)
        a = [x for g in gens for x in g.stats["acceptance"]]
        acc[rule] = sum(a) / len(a)
    assert acc["rejection"] > acc["match"], acc


@pytest.mark.parametrize("bad, match", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0, "temperature": 1.0}, "top_p"),
    ({"acceptance": "typical", "temperature": 1.0}, "acceptance"),
    ({"seed": [1, 2], "temperature": 1.0}, "seed"),
    ({"seed": "x", "temperature": 1.0}, "seed"),
])
def test_bad_sampling_requests_raise_value_error(model, bad, match):
    with pytest.raises(ValueError, match=match):
        generate(model, PROMPTS, mode="linear", max_new_tokens=4, **bad)


def test_cli_generate_sampling_flags(capsys):
    import json

    from trimode.cli import main

    argv = ["generate", "--model", "bundled", "--mode", "linear", "--block-len", "4", "--prompt", "def f(x):",
            "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--seed", "5", "--json"]
    outs = []
    for _ in range(2):
        assert main(argv) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert (outs[0]["seed"], outs[0]["acceptance_rule"], outs[0]["temperature"]) == (5, "rejection", 0.8)
    assert main(argv[:-1] + ["--acceptance", "match"]) == 0
    assert "match acceptance" in capsys.readouterr().err
    assert main(argv + ["--top-k", "-1"]) == 2
    assert "top_k" in capsys.readouterr().err
