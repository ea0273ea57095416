"""A tiny model trained for a few seconds on arithmetic sequences, for the accelerator tests.

A random model's diffusion proposals almost never match its AR tokens, so a drafter or sampler
trained on it has nothing to learn. Sequences x_{t+1} = x_t + d (mod 90) are predictable from two
tokens, so the trained model drafts and denoises some slots right and others wrong.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from _tiny import tiny_model

from trimode.train.losses import ar_loss, combine, diffusion_loss, dual_stream_inputs, split_dual
from trimode.train.noise import noise_batch

MASK = 95


def arithmetic(n: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 90, (n, 1), generator=g)
    d = torch.randint(1, 4, (n, 1), generator=g)
    return (start + d * torch.arange(L)) % 90 + 3


def prompts(n: int, seed: int, length: int = 4) -> list[list[int]]:
    return arithmetic(n, length, seed).tolist()


@lru_cache(maxsize=1)
def trained_tiny(steps: int = 60) -> torch.nn.Module:
    m = tiny_model(dtype=torch.float32, seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.25)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for s in range(steps):
        x = arithmetic(8, 24, 1000 + s)
        xt, masked, p, bls = noise_batch(x, torch.ones_like(x, dtype=torch.bool), list(range(8 * s, 8 * s + 8)),
                                         seed=0, mask_id=MASK, block_lens=[4, 8])
        tokens, positions, mask = dual_stream_inputs(xt, x, bls)
        noisy, clean = split_dual(m(tokens, positions, mask=mask))
        a, d = ar_loss(clean, x), diffusion_loss(noisy, x, masked, p)
        loss = combine(a[0], a[1], d[0], d[1], alpha=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()
