"""Mode against mode: speculative greedy == AR greedy, stub drafters, hand-counted forwards."""

import pytest
import torch
from _tiny import PROMPTS, StubDrafter, tiny_model

from trimode import generate

N = 24


@pytest.fixture(scope="module")
def models():
    return {False: tiny_model(), True: tiny_model(adapter=True)}


@pytest.fixture(scope="module")
def reference(models):
    return [g.tokens for g in generate(models[False], PROMPTS, mode="ar", max_new_tokens=N)]


def test_ar_batched_equals_batch_of_one(models, reference):
    for p, ref in zip(PROMPTS, reference):
        assert generate(models[False], [p], mode="ar", max_new_tokens=N)[0].tokens == ref
    g = generate(models[False], PROMPTS, mode="ar", max_new_tokens=N)
    assert all(x.nfe == N and x.stats["tpf"] == 1.0 for x in g)  # prefill counts as token 1's forward


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
@pytest.mark.parametrize("block_len", [1, 4, 16])
@pytest.mark.parametrize("adapter", [False, True])
def test_speculative_greedy_equals_ar(models, reference, mode, block_len, adapter):
    m = models[adapter]
    batched = generate(m, PROMPTS, mode=mode, max_new_tokens=N, block_len=block_len)
    assert [g.tokens for g in batched] == reference
    single = generate(m, [PROMPTS[2]], mode=mode, max_new_tokens=N, block_len=block_len)
    assert single[0].tokens == reference[2]
    for g in batched:
        assert sum(g.stats["step_tokens"]) == len(g.tokens) == N


def test_adapter_changes_drafts_not_output(models, reference):
    """The random adapter must really act on drafts (else the test above proves nothing)."""
    a = generate(models[False], PROMPTS, mode="linear", max_new_tokens=N, block_len=4)
    b = generate(models[True], PROMPTS, mode="linear", max_new_tokens=N, block_len=4)
    c = generate(models[True], PROMPTS, mode="linear", max_new_tokens=N, block_len=4, draft_adapter=None)
    assert [g.stats["acceptance"] for g in c] == [g.stats["acceptance"] for g in a]
    assert [g.stats["acceptance"] for g in b] != [g.stats["acceptance"] for g in a]
    assert [g.tokens for g in b] == reference


def test_dream_type_speculation_equals_ar():
    m = tiny_model(dlm_type="dream")
    ref = [g.tokens for g in generate(m, PROMPTS, mode="ar", max_new_tokens=N)]
    for mode in ("linear", "quadratic"):
        assert [g.tokens for g in generate(m, PROMPTS, mode=mode, max_new_tokens=N, block_len=4)] == ref


def test_eos_stops_each_row_in_every_mode(models, reference):
    eos = reference[0][6]  # a token AR emits mid-way for row 0
    m = tiny_model(eos=eos)
    ar = generate(m, PROMPTS, mode="ar", max_new_tokens=N)
    assert ar[0].tokens == reference[0][:6] and ar[0].finish_reason == "stop"
    for mode in ("linear", "quadratic"):
        out = generate(m, PROMPTS, mode=mode, max_new_tokens=N, block_len=4)
        assert [g.tokens for g in out] == [g.tokens for g in ar]
        assert [g.finish_reason for g in out] == [g.finish_reason for g in ar]
    stop = generate(models[False], PROMPTS, mode="linear", max_new_tokens=N, block_len=4, stop=[eos])
    assert stop[0].tokens == reference[0][:6]


# --- stub drafters: never / always / sometimes, with hand-counted forwards (N=20, k=4, B=1) -------
# linear: prefill (fused first draft, emits 1) then cycles of draft + verify; the first cycle reuses
# the prefill's draft, and a cycle with one token left (K=1) needs no draft.
# quadratic: prefill then one forward per cycle.
# "sometimes" corrupts generated tokens 5, 6 and 12: acceptance lengths 4,1,1,4,2,4,3 (see below).
CASES = {
    "always": (lambda pos: False, [4, 4, 4, 4, 3], 1 + 1 + 2 * 4, 1 + 5),
    "never": (lambda pos: True, [1] * 19, 1 + 1 + 2 * 17 + 1, 1 + 19),
    "sometimes": (lambda pos: pos in (5, 6, 12), [4, 1, 1, 4, 2, 4, 3], 1 + 1 + 2 * 6, 1 + 7),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_stub_drafters(models, case, mode):
    wrong, acceptance, nfe_linear, nfe_quadratic = CASES[case]
    m = models[False]
    ref = generate(m, [PROMPTS[0]], mode="ar", max_new_tokens=20)[0].tokens
    stub = StubDrafter([ref], 96, 95, wrong)
    g = generate(m, [PROMPTS[0]], mode=mode, max_new_tokens=20, block_len=4, draft_override=stub)[0]
    assert g.tokens == ref
    assert g.stats["acceptance"] == acceptance
    assert g.nfe == (nfe_linear if mode == "linear" else nfe_quadratic)


def test_nfe_counted_by_a_wrapper_equals_reported(models):
    calls = []
    m = models[False]

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = m
            self.config = m.config

        device = property(lambda self: m.device)
        dtype = property(lambda self: m.dtype)

        def new_cache(self, *a):
            return m.new_cache(*a)

        def adapter_names(self):
            return m.adapter_names()

        def head(self, *a, **kw):  # the output head of a forward run with hidden=True (not a forward)
            return m.head(*a, **kw)

        def forward(self, *a, **kw):
            calls.append(1)
            return m(*a, **kw)

    for mode in ("ar", "linear", "quadratic", "diffusion"):
        calls.clear()
        g = generate(Counting(), [PROMPTS[1]], mode=mode, max_new_tokens=N, block_len=4)[0]
        assert g.nfe == len(calls), mode


@pytest.mark.parametrize("bad, match", [
    (dict(mode="beam"), "unknown mode"),
    (dict(block_len=0), "block_len"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1, 2], []]), "prompt 1"),
    (dict(prompts=[[1, 500]]), "outside"),
    (dict(prompts=[[1] * 500]), "context"),
    (dict(prompts="hello"), "non-empty list"),
    (dict(threshold=1.5), "threshold"),
    (dict(stop=[1000]), "stop"),
])
def test_bad_requests_raise_value_error(models, bad, match):
    args = dict(prompts=PROMPTS, mode="linear", max_new_tokens=N, block_len=4, threshold=0.9)
    args.update(bad)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(models[False], prompts, **args)


def test_mode_without_mask_token_is_a_value_error():
    m = tiny_model()
    object.__setattr__(m, "config", m.config.replace(mask_token_id=None))
    with pytest.raises(ValueError, match="mask"):
        generate(m, PROMPTS, mode="diffusion", max_new_tokens=4)
    assert len(generate(m, PROMPTS, mode="ar", max_new_tokens=4)[0].tokens) == 4


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_rows_finishing_mid_cycle_beside_slow_rows(models, mode):
    """Row 0 always accepts and overshoots its budget mid-cycle while row 1 never accepts and keeps
    drafting full blocks: the finished row must not grow the cache past its capacity."""
    m = models[False]
    prompts = [PROMPTS[0], PROMPTS[0]]
    longer = [g.tokens for g in generate(m, prompts, mode="ar", max_new_tokens=24)]
    stub = StubDrafter([longer[0], [(t + 1) % 95 for t in longer[1]]], 96, 95)  # row 0 right past any budget
    for n in (5, 9, 10, 11):
        out = generate(m, prompts, mode=mode, max_new_tokens=n, block_len=4, draft_override=stub)
        assert [g.tokens for g in out] == [t[:n] for t in longer]
