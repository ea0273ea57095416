"""The counters a user reads: speculative acceptance when EOS / the budget ends a row, and per-row
diffusion NFE in a batch (a row is charged only for the forwards its own block needed)."""

from __future__ import annotations

import time

import pytest
import torch
from _tiny import PROMPTS, StubDrafter, tiny_model

from trimode.decode import DecodeConfig, Row, generate, make_decoder
from trimode.decode import Oracle as OraclePolicy
from trimode.decode.rows import DENOISE, QUADRATIC, VERIFY

N = 24
K = 4
STUBS = {
    "model": None,  # the model's own drafts, only recorded
    "always": lambda pos: False,
    "never": lambda pos: True,
    "sometimes": lambda pos: pos % 3 == 1,
}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    """AR greedy continuations, long enough to hold every token a verifier may predict."""
    return [g.tokens for g in generate(model, PROMPTS, mode="ar", max_new_tokens=N + K)]


class Recorder:
    """A draft_override that logs, per verifying forward and row, (row index, token index of the first
    draft, drafts), optionally replacing the drafts with a stub's first."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, list[int]]] = []

    def __call__(self, drafts: torch.Tensor, rows) -> torch.Tensor:
        out = self.inner(drafts, rows) if self.inner is not None else drafts
        for b, r in enumerate(rows):
            self.calls.append((r.index, len(r.tokens), out[b].tolist()))
        return out


def expected_acceptance(calls, ref: list[int]) -> list[int]:
    """accepted + 1 per verifying forward, from the drafts and the AR reference alone: greedy, the
    verifier's token for generated token t is ref[t] along the accepted path, EOS or not."""
    out = []
    for _, start, drafts in calls:
        n = 0
        while n < len(drafts) and drafts[n] == ref[start + n]:
            n += 1
        out.append(n + 1)
    return out


def stub(case: str, reference) -> Recorder:
    wrong = STUBS[case]
    return Recorder(None if wrong is None else StubDrafter(reference, 96, 95, wrong))


def decode(model, mode, budgets, *, stop_ids=(), **cfg) -> list[Row]:
    """Rows PROMPTS[:len(budgets)] decoded together through the step-level API (traces kept)."""
    dec = make_decoder(model, mode, DecodeConfig(max_new_tokens=max(budgets), **cfg))
    rows = [Row(PROMPTS[i], max_new_tokens=n, stop_ids=stop_ids, index=i) for i, n in enumerate(budgets)]
    with torch.inference_mode():
        dec.admit(rows)
        while not dec.idle:
            dec.cycle()
    return rows


@pytest.mark.parametrize("case", sorted(STUBS))
@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_a_verify_that_emits_only_eos_reports_acceptance_at_least_one(model, reference, mode, case):
    ref = reference[0]
    kw = dict(mode=mode, max_new_tokens=N, block_len=K)
    # Dry run (no EOS): where the verifying forwards start. EOS := the token a verify produces first,
    # so that verify emits nothing but EOS (the token must not occur earlier in the output).
    dry = stub(case, reference)
    assert generate(model, [PROMPTS[0]], draft_override=dry, **kw)[0].tokens == ref[:N]
    starts = [s for _, s, _ in dry.calls if s >= 1 and ref[s] not in ref[:s]]
    assert starts, "no verify start gives a usable EOS"
    t = starts[len(starts) // 2]
    eos = ref[t]
    m = tiny_model(eos=eos)

    rec = stub(case, reference)
    g = generate(m, [PROMPTS[0]], draft_override=rec, **kw)[0]
    assert g.tokens == ref[:t] and g.finish_reason == "stop"
    st = g.stats
    verifies = st["forwards"].get(VERIFY, 0) + st["forwards"].get(QUADRATIC, 0)
    assert len(rec.calls) == verifies == len(st["acceptance"])
    assert rec.calls[-1][1] == t  # the last verify starts at the EOS ...
    assert st["step_tokens"][-1] == 0  # ... and keeps nothing (EOS is no token of the output)
    assert sum(st["step_tokens"]) == st["tokens"] == len(g.tokens) == t
    assert all(a >= 1 for a in st["acceptance"])
    want = expected_acceptance(rec.calls, ref)
    assert st["acceptance"] == want
    assert st["mean_acceptance"] == pytest.approx(sum(want) / len(want))
    if case == "always":  # the verifier accepted the whole block, drafts after the EOS included
        assert st["acceptance"][-1] == K
    if case == "never":
        assert st["acceptance"] == [1] * verifies

    # The same run through the step-level API: identical stats; per verifying forward, tokens kept
    # == acceptance except in the last one, which EOS cut short.
    (row,) = decode(m, mode, [N], stop_ids={eos}, block_len=K, draft_override=stub(case, reference))
    assert row.stats(mode) == st
    kept = [e[1] for e in row.trace if e[0] in (VERIFY, QUADRATIC)]
    assert kept[:-1] == st["acceptance"][:-1] and kept[-1] == 0 < st["acceptance"][-1]


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_eos_everywhere_in_a_batch_never_gives_acceptance_zero(model, reference, mode):
    """EOS := a token the rows emit somewhere; every verify, whatever EOS cuts, counts >= 1."""
    for eos in sorted({ref[j] for ref in reference for j in (3, 7, 11)}):
        rec = Recorder()
        gens = generate(tiny_model(eos=eos), PROMPTS, mode=mode, max_new_tokens=N, block_len=K, draft_override=rec)
        for i, g in enumerate(gens):
            st = g.stats
            assert all(a >= 1 for a in st["acceptance"])
            want = expected_acceptance([c for c in rec.calls if c[0] == i], reference[i])
            # A linear cycle with one token left in the whole batch verifies without drafts (and
            # without calling the override): acceptance 1.
            missing = len(st["acceptance"]) - len(want)
            assert missing in ((0, 1) if mode == "linear" else (0,))
            assert st["acceptance"] == want + [1] * missing
            assert sum(st["step_tokens"]) == len(g.tokens)


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_sampled_rows_with_eos_count_every_verify(model, reference, mode):
    eos = reference[0][4]
    gens = generate(tiny_model(eos=eos), PROMPTS * 3, mode=mode, max_new_tokens=N, block_len=K, temperature=1.0,
                    seed=3)
    for g in gens:
        st = g.stats
        n_verify = st["forwards"].get(VERIFY, 0) + st["forwards"].get(QUADRATIC, 0)
        assert len(st["acceptance"]) == n_verify and all(1 <= a <= K for a in st["acceptance"])


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_budget_cut_reports_what_the_verifier_accepted(model, reference, mode):
    """Row 0 (budget 6) shares its second cycle with row 1 (budget 24): the cycle is a full block, the
    verifier accepts all of it, the budget keeps one token. acceptance says 4 (the verifier's
    decision), step_tokens 1 (what was kept); alone, the last cycle is narrowed to the budget."""
    rec = Recorder(StubDrafter(reference, 96, 95))
    rows = decode(model, mode, [6, N], block_len=K, draft_override=rec)
    st = rows[0].stats(mode)
    assert rows[0].finish_reason == "length" and rows[0].tokens == reference[0][:6]
    assert st["acceptance"] == [K, K] == expected_acceptance([c for c in rec.calls if c[0] == 0], reference[0])
    assert st["step_tokens"][-1] == 1 and sum(st["step_tokens"]) == 6
    alone = generate(model, [PROMPTS[0]], mode=mode, max_new_tokens=6, block_len=K,
                     draft_override=StubDrafter(reference, 96, 95))[0]
    assert alone.tokens == rows[0].tokens and alone.stats["acceptance"] == [K, 1]


# --- diffusion: per-row counters batched == alone ---------------------------------------------------

def _diffusion_alone_vs_batched(model, budgets=None, oracle=None, **kw):
    """Decode PROMPTS together (per-row budgets when given) and each alone; per-row tokens, nfe and
    stats must agree. oracle: AR references, for the Oracle unmasking policy (per row index)."""
    batch_kw = dict(kw, policy=OraclePolicy(oracle)) if oracle else kw
    batched = (generate(model, PROMPTS, mode="diffusion", **batch_kw) if budgets is None
               else _step_level(model, budgets, **batch_kw))
    for i, g in enumerate(batched):
        one = dict(kw, max_new_tokens=kw["max_new_tokens"] if budgets is None else budgets[i])
        if "seed" in kw:
            one["seed"] = kw["seed"] + i  # the seed prompt i gets in the batch
        if oracle:
            one["policy"] = OraclePolicy([oracle[i]])
        alone = generate(model, [PROMPTS[i]], mode="diffusion", **one)[0]
        assert alone.tokens == g.tokens, i
        assert alone.nfe == g.nfe, (i, alone.nfe, g.nfe)
        assert alone.stats == g.stats, i
    return batched


def _step_level(model, budgets, *, max_new_tokens, block_len, threshold, **kw):
    from trimode.decode import generations, prepare, run

    m, cfg, rows = prepare(model, PROMPTS, mode="diffusion", max_new_tokens=max_new_tokens, block_len=block_len,
                           threshold=threshold, **kw)
    for r, n in zip(rows, budgets):
        r.max_new_tokens = n
    for _ in run(model, m, cfg, rows):
        pass
    return generations(rows, m)


def test_diffusion_reproduction_nfe(model):
    """The reported case: alone [18, 20, 17, 18]; batched it used to be [20, 20, 20, 20]."""
    kw = dict(mode="diffusion", max_new_tokens=20, block_len=4, threshold=0.2)
    alone = [generate(model, [p], **kw)[0].nfe for p in PROMPTS]
    batched = [g.nfe for g in generate(model, PROMPTS, **kw)]
    assert alone == [18, 20, 17, 18] == batched


@pytest.mark.parametrize("block_len", [1, 2, 4, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.9, 1.0, None])
def test_diffusion_per_row_counters_batched_equal_alone(model, threshold, block_len):
    gens = _diffusion_alone_vs_batched(model, max_new_tokens=20, block_len=block_len, threshold=threshold)
    for g in gens:
        assert sum(g.stats["step_tokens"]) == len(g.tokens) == 20


@pytest.mark.parametrize("block_len", [3, 8])
def test_diffusion_counters_with_eos_ragged_budgets_and_sampling(model, reference, block_len):
    eos = reference[1][9]
    m = tiny_model(eos=eos)
    kw = dict(max_new_tokens=20, block_len=block_len, threshold=0.3)
    _diffusion_alone_vs_batched(m, **kw)
    _diffusion_alone_vs_batched(m, [20, 7, 13, 5], **kw)
    _diffusion_alone_vs_batched(model, [20, 7, 13, 5], **kw, temperature=1.0, seed=5)
    _diffusion_alone_vs_batched(model, oracle=reference, **kw)
    _diffusion_alone_vs_batched(model, [20, 7, 13, 5], **{**kw, "threshold": None}, steps=2)


def test_diffusion_denoise_entries_only_while_the_block_has_masks(model):
    """Rows of one batch need different numbers of denoising forwards (else the tests above prove
    nothing), and no row is charged a DENOISE forward that filled none of its own slots."""
    rows = decode(model, "diffusion", [20] * len(PROMPTS), block_len=4, threshold=0.2)
    assert len({r.stats("diffusion")["forwards"][DENOISE] for r in rows}) > 1
    for r in rows:
        assert all(e[1] >= 1 for e in r.trace if e[0] == DENOISE)


def test_server_usage_forwards_follow_row_nfe():
    """usage.forwards of diffusion requests batched by the engine equals each request's NFE alone."""
    pytest.importorskip("fastapi")
    from trimode.checkpoint import load_model
    from trimode.cli import BUNDLED
    from trimode.serve.engine import Done, Engine, EngineConfig, Failed, Job
    from trimode.tokenizer import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bundled = load_model(BUNDLED)
        texts = ["def fibonacci(n):", "import os\n", "class Stack:", "x = ["]
        prompts = [tok.encode(t) for t in texts]
        kw = dict(mode="diffusion", max_new_tokens=16, block_len=4, threshold=0.1, eos_id=tok.eos_id)
        alone = [generate(bundled, [p], **kw)[0] for p in prompts]
        assert len({a.nfe for a in alone}) > 1  # (batched, every row used to be charged the slowest's)
        eng = Engine(bundled, tok, EngineConfig(max_running=8))
        eng.start()
        try:
            evs: list[list] = [[] for _ in prompts]
            with eng._cv:  # every job is queued before the worker admits: one batch
                for p, e in zip(prompts, evs):
                    eng.submit(Job(prompt=p, max_tokens=16, mode="diffusion", block_len=4, threshold=0.1,
                                   stop_ids=frozenset({tok.eos_id}), stops=[], sink=e.append))
            t0 = time.time()
            while not all(e and isinstance(e[-1], (Done, Failed)) for e in evs):
                assert time.time() - t0 < 120
                time.sleep(0.01)
        finally:
            eng.close()
        for a, e in zip(alone, evs):
            assert isinstance(e[-1], Done), e[-1]
            use = e[-1].usage
            assert use["completion_tokens"] == len(a.tokens) and use["forwards"] == a.nfe
        assert eng.metrics.forwards.get(mode="diffusion", kind="prefill") == 1  # one batch
        assert eng.metrics.row_forwards.get(mode="diffusion") == sum(a.nfe for a in alone)
    finally:
        torch.set_num_threads(threads)
