"""Step-level decoders: rows join and leave between cycles without changing any row's tokens."""

import pytest
import torch
from _tiny import PROMPTS, tiny_model

from trimode.cache import KVCache
from trimode.decode import DecodeConfig, Oracle, Row, generate, make_decoder

MODES = ["ar", "linear", "quadratic", "diffusion"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(eos=None, adapter=True)


def alone(model, mode, prompt, n):
    return generate(model, [prompt], mode=mode, max_new_tokens=n, block_len=4)[0].tokens


@pytest.mark.parametrize("mode", MODES)
def test_rows_joining_mid_run_decode_as_if_alone(model, mode):
    budgets = [19, 7, 12, 5]
    dec = make_decoder(model, mode, DecodeConfig(max_new_tokens=8, block_len=4))
    rows = [Row(p, max_new_tokens=n, index=i) for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
    with torch.inference_mode():
        dec.admit(rows[:1])
        for _ in range(2):
            dec.cycle()
        dec.admit(rows[1:3])  # join a running batch
        dec.cycle()
        dec.admit(rows[3:])
        sizes = []
        while not dec.idle:
            sizes.append(len(dec.running))
            dec.cycle()
    for r, p, n in zip(rows, PROMPTS, budgets):
        assert r.tokens == alone(model, mode, p, n), (mode, r.index)
        assert r.finish_reason == "length"
    assert sizes[0] > sizes[-1]  # finished rows left the batch


@pytest.mark.parametrize("mode", MODES)
def test_cancel_frees_the_row_at_the_next_boundary(model, mode):
    dec = make_decoder(model, mode, DecodeConfig(max_new_tokens=30, block_len=4))
    rows = [Row(p, max_new_tokens=30, index=i) for i, p in enumerate(PROMPTS[:3])]
    with torch.inference_mode():
        dec.admit(rows)
        dec.cycle()
        rows[1].cancel()
        n_before = len(rows[1].tokens)
        dec.cycle()
        assert [r.index for r in dec.running] == [0, 2]
        assert dec.cache.batch_size == 2
        while not dec.idle:
            dec.cycle()
    assert rows[1].finish_reason == "cancelled" and len(rows[1].tokens) == n_before
    assert rows[0].tokens == alone(model, mode, PROMPTS[0], 30)


def test_admit_rejects_bad_rows(model):
    dec = make_decoder(model, "linear", DecodeConfig(max_new_tokens=4, block_len=4))
    for bad in ([], [96], [1] * 510):
        with pytest.raises(ValueError):
            dec.admit([Row(bad, max_new_tokens=4)])
    with pytest.raises(ValueError):
        dec.admit([Row([1, 2], max_new_tokens=0)])
    assert dec.idle


def test_cache_select_and_cat_keep_each_rows_entries(model):
    c = model.config
    a, b = KVCache(c, 2, 8), KVCache(c, 1, 12)
    for cache, val in ((a, 1.0), (b, 2.0)):
        for buf in (*cache.k, *cache.v):
            buf.fill_(val)
            buf[0].add_(10.0)
    a.length = torch.tensor([3, 5])
    b.length = torch.tensor([7])
    m = KVCache.cat([a, b])
    assert m.batch_size == 3 and m.capacity == 12 and m.length.tolist() == [3, 5, 7]
    assert float(m.k[0][0, 0, 0, 0]) == 11.0 and float(m.k[0][1, 0, 0, 0]) == 1.0
    assert float(m.v[1][2, 0, 11, 0]) == 12.0 and float(m.k[0][1, 0, 11, 0]) == 0.0  # padding
    s = m.select([2, 0])
    assert s.length.tolist() == [7, 3] and float(s.k[0][0, 0, 0, 0]) == 12.0 and float(s.k[0][1, 0, 0, 0]) == 11.0
    with pytest.raises(ValueError):
        m.select([])


def test_oracle_policy_reproduces_ar_and_bounds_the_threshold_policy(model):
    n = 24
    ref = [g.tokens for g in generate(model, PROMPTS, mode="ar", max_new_tokens=n + 8)]
    sol = generate(model, PROMPTS, mode="diffusion", max_new_tokens=n, block_len=8, policy=Oracle(ref))
    assert [g.tokens for g in sol] == [r[:n] for r in ref]
    one_per_step = generate(model, PROMPTS, mode="diffusion", max_new_tokens=n, block_len=8, threshold=1.0)
    for s, t in zip(sol, one_per_step):
        assert s.nfe <= t.nfe


def test_diffusion_steps_name_exactly_the_rows_in_each_forward(model):
    """Participation read from the Steps equals each row's own forward count (EMIT Steps run no forward)."""
    from trimode.decode import prepare, run
    from trimode.decode.rows import EMIT

    m, cfg, rows = prepare(model, PROMPTS[:3], mode="diffusion", max_new_tokens=9, block_len=4, threshold=0.9)
    rows[1].max_new_tokens = 4  # finishes a block earlier than the others
    seen = [0] * len(rows)
    emitted = [[] for _ in range(len(rows))]
    for step in run(model, m, cfg, rows):
        for b, toks in enumerate(step.new_tokens):
            if toks is not None and step.kind != EMIT:
                seen[b] += 1
            if toks:
                emitted[b] += toks
    assert seen == [len(r.trace) for r in rows]
    assert emitted == [r.tokens for r in rows]
