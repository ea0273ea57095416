"""The cache invariant: cached == uncached, and masked blocks over a cached prefix == one full forward."""

import pytest
import torch
from _tiny import tiny_model

from trimode import masks
from trimode.cache import KVCache


def test_cached_incremental_equals_uncached():
    m = tiny_model()
    toks = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    full = m(toks)
    cache = m.new_cache(2, 32)
    out = [m(toks[:, :10], cache=cache)]
    cache.commit(10)
    for t in range(10, 24):
        out.append(m(toks[:, t : t + 1], cache=cache))
        cache.commit(1)
    inc = torch.cat(out, dim=1)
    assert (inc - full).abs().max() < 1e-10


def test_ragged_rows_commit_independently():
    m = tiny_model()
    a, b = [3, 4, 5, 6, 7], [8, 9]
    cache = m.new_cache(2, 16)
    toks = torch.tensor([a, b + [0, 0, 0]])
    m(toks, cache=cache)
    cache.commit(torch.tensor([5, 2]))
    nxt = torch.tensor([[11], [12]])
    got = m(nxt, cache=cache)
    ref_a = m(torch.tensor([a + [11]]))[:, -1]
    ref_b = m(torch.tensor([b + [12]]))[:, -1]
    assert (got[0, 0] - ref_a[0]).abs().max() < 1e-10
    assert (got[1, 0] - ref_b[0]).abs().max() < 1e-10


def test_masked_block_over_cached_prefix_equals_full_mask():
    m = tiny_model()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 90, (1, 12), generator=g)
    block = torch.randint(0, 90, (1, 6), generator=g)
    block[0, 2:] = 95  # mask tokens
    cache = m.new_cache(1, 32)
    m(prefix, cache=cache)
    cache.commit(12)
    S = 18
    got = m(block, mask=masks.with_prefix(masks.bidirectional(6), cache.length, S), cache=cache)
    full_mask = torch.zeros(18, 18, dtype=torch.bool)
    full_mask[:12, :12] = masks.causal(12)
    full_mask[12:, :] = True
    ref = m(torch.cat([prefix, block], 1), mask=full_mask)[:, 12:]
    assert (got - ref).abs().max() < 1e-10
    assert int(cache.length[0]) == 12  # a forward never commits


def test_training_mask_agrees_with_inference():
    """Noisy-stream logits under the dual-stream training mask == diffusion logits of that block
    over the causally cached clean prefix (what the decoders do)."""
    m = tiny_model()
    L, bl = 16, 4
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 90, (1, L), generator=g)
    xt = x0.clone()
    xt[0, torch.rand(L, generator=g) < 0.5] = 95
    pos = torch.arange(L)[None]
    train = m(torch.cat([xt, x0], 1), torch.cat([pos, pos], 1), mask=masks.dual_stream(L, bl))
    for blk in range(L // bl):
        lo, hi = blk * bl, (blk + 1) * bl
        cache = m.new_cache(1, L + bl)
        if lo:
            m(x0[:, :lo], cache=cache)
            cache.commit(lo)
        S = lo + bl
        inf = m(xt[:, lo:hi], mask=masks.with_prefix(masks.bidirectional(bl), cache.length, S), cache=cache)
        assert (inf - train[:, lo:hi]).abs().max() < 1e-10, blk
    # and the clean stream is plain causal AR
    assert (train[:, L:] - m(x0)).abs().max() < 1e-10


def test_compact_and_truncate():
    m = tiny_model()
    cache = m.new_cache(2, 16)
    m(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), cache=cache)
    before = cache.k[0].clone()
    cache.compact(torch.tensor([[0, 2], [1, 3]]), torch.tensor([2, 1]))
    assert cache.length.tolist() == [2, 1]
    assert torch.equal(cache.k[0][0, :, 1], before[0, :, 2])
    assert torch.equal(cache.k[0][1, :, 0], before[1, :, 1])
    cache.truncate(torch.tensor([1, 0]))
    assert cache.length.tolist() == [1, 0]
    with pytest.raises(ValueError):
        cache.truncate(torch.tensor([5, 0]))


def test_compact_equals_a_naive_gather_for_random_paths():
    """compact moves only what a row commits past the run already in place; the committed entries
    must still be exactly the chosen scratch entries, in order, for every row (prefix and ragged n)."""
    m = tiny_model()
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        B, P, T = 3, int(torch.randint(0, 4, (1,), generator=g)), 7
        cache = m.new_cache(B, 16)
        if P:
            m(torch.randint(0, 90, (B, P), generator=g), cache=cache)
            cache.commit(P)
        m(torch.randint(0, 90, (B, T), generator=g), cache=cache)
        before = [b.clone() for b in (*cache.k, *cache.v)]
        K = int(torch.randint(1, T + 1, (1,), generator=g))
        keep = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                       torch.sort(torch.randperm(T - 1, generator=g)[: K - 1] + 1).values])
                            for _ in range(B)])
        if trial % 3 == 0:  # a shared in-place prefix, as after a chain-like accepted path
            keep[:, : K // 2 + 1] = torch.arange(K // 2 + 1)[None, :]
            keep = torch.sort(keep, dim=1).values
            keep = torch.stack([torch.unique_consecutive(r) for r in keep]) if all(
                torch.unique_consecutive(r).numel() == K for r in keep) else torch.arange(K).expand(B, K).clone()
        n = torch.randint(0, K + 1, (B,), generator=g)
        cache.compact(keep, n)
        assert cache.length.tolist() == [P + int(x) for x in n]
        for buf, old in zip((*cache.k, *cache.v), before):
            for b in range(B):
                for j in range(int(n[b])):
                    assert torch.equal(buf[b, :, P + j], old[b, :, P + int(keep[b, j])])
                assert torch.equal(buf[b, :, :P], old[b, :, :P])


def test_cache_overflow_and_bad_commit_are_value_errors():
    m = tiny_model()
    cache = KVCache(m.config, 1, 4, dtype=m.dtype)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
    m(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="scratch"):
        cache.commit(3)
