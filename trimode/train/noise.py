"""Forward (masking) process of the diffusion stream, as pure functions (docs/design-notes.md §3).

All randomness comes from explicit `torch.Generator`s keyed by (seed, global sample index) through
`sample_generator`, so a sample gets the same noise and block length whatever the number of ranks,
the micro-batch split or the point a run was resumed from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

DEFAULT_EPS = 1e-3


def derive_seed(seed: int, index: int, stream: str = "noise") -> int:
    """A 63-bit seed from (seed, index, stream) by hashing: independent streams, no global RNG."""
    h = hashlib.blake2b(f"{stream}:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, index: int, stream: str = "noise") -> torch.Generator:
    """A CPU generator private to one sample (`index` is the global sample index)."""
    return torch.Generator().manual_seed(derive_seed(seed, index, stream))


def sample_block_len(choices: Sequence[int], gen: torch.Generator) -> int:
    """One block length drawn uniformly from `choices` (the random-block-length option)."""
    if len(choices) == 0:
        raise ValueError("block length choices must not be empty")
    if any(int(b) < 1 for b in choices):
        raise ValueError(f"block lengths must be >= 1, got {list(choices)}")
    if len(choices) == 1:
        return int(choices[0])
    i = int(torch.randint(len(choices), (1,), generator=gen).item())
    return int(choices[i])


def uniform_noise(
    x0: torch.Tensor,
    loss_mask: torch.Tensor,
    mask_id: int,
    *,
    gen: torch.Generator,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask one sequence with the LLaDA schedule.

    x0: (L,) clean ids; loss_mask: (L,) bool, True where the token is supervised (only those are
    noised). Draws t ~ U(0, 1), sets p = (1 - eps) t + eps and masks each supervised token
    independently with probability p. Returns (xt (L,), masked (L,) bool, p (L,) float32).
    """
    if x0.dim() != 1 or loss_mask.shape != x0.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and loss_mask {tuple(loss_mask.shape)} must be equal (L,)")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    L = x0.shape[0]
    t = torch.rand((), generator=gen)
    p = (1.0 - eps) * t + eps
    u = torch.rand(L, generator=gen)
    masked = (u < p) & loss_mask.bool()
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked, torch.full((L,), float(p), dtype=torch.float32)


def exp_weighted_noise(
    x0: torch.Tensor,
    loss_mask: torch.Tensor,
    mask_id: int,
    *,
    gen: torch.Generator,
    half_life_ratio: float = 0.25,
    block_len: int | None = None,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Efficient-DLM position-dependent masking (arXiv 2512.14067).

    Per segment (the whole sequence, or each block of `block_len`): draw m ~ U(eps, 1), mask exactly
    round(m * n) of its n supervised tokens (at least 1 for a whole sequence), chosen without
    replacement by Gumbel-top-k on log-weights lambda (1 - m) i with lambda = ln 2 / (half_life_ratio
    * n). At m -> 1 the choice is uniform; at small m it favours late positions. p = m.
    Returns (xt (L,), masked (L,) bool, p (L,) float32).
    """
    if x0.dim() != 1 or loss_mask.shape != x0.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and loss_mask {tuple(loss_mask.shape)} must be equal (L,)")
    if not half_life_ratio > 0:
        raise ValueError(f"half_life_ratio must be > 0, got {half_life_ratio}")
    L = x0.shape[0]
    seg = L if block_len is None else int(block_len)
    if seg < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    lm = loss_mask.bool()
    masked = torch.zeros(L, dtype=torch.bool)
    p = torch.zeros(L, dtype=torch.float32)
    for start in range(0, L, seg):
        idx = torch.arange(start, min(start + seg, L))
        m = float(eps + (1.0 - eps) * torch.rand((), generator=gen))
        gumbel = -torch.log(-torch.log(torch.rand(len(idx), generator=gen).clamp_min(1e-20)))
        sup = lm[idx]
        n = int(sup.sum())
        p[idx] = m
        if n == 0:
            continue
        k = round(m * n)
        k = max(1, min(n, k)) if block_len is None else max(0, min(n, k))
        if k == 0:
            continue
        lam = math.log(2.0) / (half_life_ratio * len(idx))
        i = torch.arange(len(idx), dtype=torch.float32)
        score = lam * (1.0 - m) * i + gumbel
        score = torch.where(sup, score, torch.full_like(score, -math.inf))
        chosen = idx[score.topk(k).indices]
        masked[chosen] = True
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked, p


def noise_batch(
    x0: torch.Tensor,
    loss_mask: torch.Tensor,
    sample_indices: Sequence[int],
    *,
    seed: int,
    mask_id: int,
    block_lens: Sequence[int],
    schedule: str = "uniform",
    eps: float = DEFAULT_EPS,
    half_life_ratio: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Noise a batch, each row with the generator of its global sample index.

    x0, loss_mask: (B, L). Returns xt (B, L), masked (B, L) bool, p (B, L) float32 and the block
    length drawn for each row. The block length is drawn first from the same per-sample generator.
    """
    if schedule not in ("uniform", "exp"):
        raise ValueError(f"noise schedule must be 'uniform' or 'exp', got {schedule!r}")
    if x0.dim() != 2 or loss_mask.shape != x0.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and loss_mask {tuple(loss_mask.shape)} must be equal (B, L)")
    if len(sample_indices) != x0.shape[0]:
        raise ValueError(f"{len(sample_indices)} sample indices for a batch of {x0.shape[0]}")
    xs, ms, ps, bls = [], [], [], []
    for row, gi in enumerate(sample_indices):
        g = sample_generator(seed, gi)
        bl = sample_block_len(block_lens, g)
        if schedule == "uniform":
            xt, m, p = uniform_noise(x0[row].cpu(), loss_mask[row].cpu(), mask_id, gen=g, eps=eps)
        else:
            xt, m, p = exp_weighted_noise(
                x0[row].cpu(), loss_mask[row].cpu(), mask_id, gen=g, half_life_ratio=half_life_ratio,
                block_len=bl, eps=eps,
            )
        xs.append(xt)
        ms.append(m)
        ps.append(p)
        bls.append(bl)
    return torch.stack(xs), torch.stack(ms), torch.stack(ps), bls
