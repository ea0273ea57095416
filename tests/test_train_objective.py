"""Noise, masks and losses of the joint objective on small hand-checked cases."""

import math

import pytest
import torch

from trimode.masks import dual_stream
from trimode.train.losses import ar_loss, combine, diffusion_loss, dual_stream_inputs, split_dual
from trimode.train.noise import (
    derive_seed,
    exp_weighted_noise,
    noise_batch,
    sample_block_len,
    sample_generator,
    uniform_noise,
)

MASK = 99


def test_dual_stream_mask_hand_written_L4_B2():
    # rows: queries [n0 n1 n2 n3 c0 c1 c2 c3]; columns: keys, same order.
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(dual_stream(4, 2), expected)


def test_dual_stream_inputs_shared_positions_and_per_row_masks():
    x0 = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    xt = torch.tensor([[MASK, 2, MASK, 4], [5, MASK, 7, 8]])
    tokens, positions, mask = dual_stream_inputs(xt, x0, [2, 4])
    assert tokens.tolist() == [[MASK, 2, MASK, 4, 1, 2, 3, 4], [5, MASK, 7, 8, 5, 6, 7, 8]]
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2
    assert torch.equal(mask[0], dual_stream(4, 2)) and torch.equal(mask[1], dual_stream(4, 4))
    with pytest.raises(ValueError):
        dual_stream_inputs(xt, x0, [2])


def test_uniform_noise_rate_and_loss_mask():
    x0 = torch.arange(1000)
    lm = torch.ones(1000, dtype=torch.bool)
    lm[:500] = False  # a prompt: never noised
    g = sample_generator(0, 7)
    t = float(torch.rand((), generator=sample_generator(0, 7)))  # the first draw is t
    xt, masked, p = uniform_noise(x0, lm, MASK, gen=g, eps=0.1)
    assert torch.allclose(p, torch.full((1000,), 0.9 * t + 0.1))
    assert not masked[:500].any()
    assert torch.equal(xt[masked], torch.full((int(masked.sum()),), MASK))
    assert torch.equal(xt[~masked], x0[~masked])
    assert abs(masked[500:].float().mean().item() - p[0].item()) < 0.08


def test_noise_keyed_by_global_sample_index_not_batch():
    x0 = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    lm = torch.ones(3, 16, dtype=torch.bool)
    a = noise_batch(x0, lm, [10, 11, 12], seed=3, mask_id=MASK, block_lens=[4, 8, 16])
    b = noise_batch(x0[1:2], lm[1:2], [11], seed=3, mask_id=MASK, block_lens=[4, 8, 16])
    assert torch.equal(a[0][1], b[0][0]) and a[3][1] == b[3][0]
    c = noise_batch(x0, lm, [10, 11, 12], seed=4, mask_id=MASK, block_lens=[4, 8, 16])
    assert not torch.equal(a[1], c[1])
    assert derive_seed(0, 1) != derive_seed(1, 0)


def test_sample_block_len():
    g = torch.Generator().manual_seed(0)
    seen = {sample_block_len([4, 8, 16, 32], g) for _ in range(200)}
    assert seen == {4, 8, 16, 32}
    with pytest.raises(ValueError):
        sample_block_len([], g)


def test_exp_weighted_noise_counts_and_late_bias():
    L = 64
    x0 = torch.arange(L)
    lm = torch.ones(L, dtype=torch.bool)
    late = early = 0
    for i in range(200):
        _, masked, p = exp_weighted_noise(x0, lm, MASK, gen=sample_generator(0, i), half_life_ratio=0.1)
        m = float(p[0])
        assert int(masked.sum()) == max(1, min(L, round(m * L)))
        late += int(masked[L // 2:].sum())
        early += int(masked[: L // 2].sum())
    assert late > early  # position-dependent: later tokens are masked more often
    # Per block: the count is round(m_b * n) in each block, with m drawn per block.
    _, masked, p = exp_weighted_noise(x0, lm, MASK, gen=sample_generator(1, 0), block_len=16)
    for s in range(0, L, 16):
        assert int(masked[s:s + 16].sum()) == round(float(p[s]) * 16)


def test_split_and_losses_by_hand():
    V = 5
    logits = torch.zeros(1, 8, V)  # uniform predictions: CE = log V everywhere
    noisy, clean = split_dual(logits)
    assert noisy.shape == clean.shape == (1, 4, V)
    x0 = torch.tensor([[1, 2, 3, 4]])
    masked = torch.tensor([[False, True, True, False]])
    p = torch.tensor([[0.5, 0.5, 0.25, 0.5]])
    s, n = diffusion_loss(noisy, x0, masked, p)
    assert int(n) == 2 and math.isclose(float(s), math.log(V) / 0.5 + math.log(V) / 0.25, rel_tol=1e-6)
    # dream: position i-1 predicts token i, so a masked token 0 is not scored.
    sd, nd = diffusion_loss(noisy, x0, torch.tensor([[True, True, False, False]]), p, dlm_type="dream")
    assert int(nd) == 1 and math.isclose(float(sd), math.log(V) / 0.5, rel_tol=1e-6)
    # AR: labels x0[1:], with the loss mask over labels.
    sa, na = ar_loss(clean, x0, torch.tensor([[False, False, True, True]]))
    assert int(na) == 2 and math.isclose(float(sa), 2 * math.log(V), rel_tol=1e-6)


def test_losses_pick_the_right_positions():
    x0 = torch.tensor([[0, 1, 2]])
    logits = torch.full((1, 3, 3), -1e4)
    logits[0, 0, 1] = logits[0, 1, 2] = 0.0  # the AR stream predicts the next token perfectly
    sa, na = ar_loss(logits, x0)
    assert int(na) == 2 and float(sa) < 1e-3
    same = torch.full((1, 3, 3), -1e4)
    same[0, torch.arange(3), x0[0]] = 0.0  # the diffusion stream predicts its own position
    sd, _ = diffusion_loss(same, x0, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3))
    assert float(sd) < 1e-3


def test_combine_is_global_average():
    total = combine(torch.tensor(6.0), 3, torch.tensor(10.0), 5, alpha=0.3)
    assert math.isclose(float(total), 2.0 + 0.3 * 2.0, rel_tol=1e-6)
    assert float(combine(torch.tensor(0.0), 0, torch.tensor(0.0), 0, alpha=0.3)) == 0.0
