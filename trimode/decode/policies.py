"""Unmasking policies for diffusion mode: which masked slots to fill after a denoising forward.

A policy is a small object with `select(conf, candidates, step, ctx) -> fill`, all (B, n) tensors:
conf holds the confidence of each slot's proposal, candidates marks slots still masked (and rows
still denoising), fill marks the slots to fill now. `ctx` (a PolicyContext) carries what richer
policies need: the proposals, the full distributions, which canvas slots are filled, the rows and
where the block starts in each row's output. Threshold and EvenSchedule are vectorised over the
batch; the Oracle (a measuring instrument, not a decoder) loops over rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PolicyContext:
    """What a policy may look at after a denoising forward over a block of n + 1 canvas slots.

    proposal (B, n): top-1 token of each masked slot (a policy may overwrite entries it fills);
    probs (B, n, V): the distributions; filled (B, n + 1): canvas slots already fixed (slot 0 is
    the seed); rows: the decoding rows; start[b]: index in rows[b].tokens of canvas slot 0, so
    canvas slot i + 1 is generated token start[b] + i + 1.
    """

    proposal: torch.Tensor
    probs: torch.Tensor
    filled: torch.Tensor
    rows: Sequence
    start: Sequence[int]


def _top1(conf: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each row's single most confident candidate (rows without candidates select nothing)."""
    scored = conf.masked_fill(~candidates, float("-inf"))
    best = torch.zeros_like(candidates)
    best.scatter_(1, scored.argmax(dim=1, keepdim=True), True)
    return best & candidates


def threshold_select(score: torch.Tensor, candidates: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Every candidate scoring >= tau (a float or a (B, 1) tensor, one per row), and always each
    row's best-scoring candidate, so every forward makes progress."""
    return (candidates & (score >= tau)) | _top1(score, candidates)


def joint_select(score: torch.Tensor, candidates: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """The "joint" rule: take each row's candidates best-first while the product of their scores
    stays >= tau (and always the best one). With scores that are calibrated probabilities of being
    right, tau bounds the chance that this forward commits any wrong token, which is what breaks
    agreement with AR; the per-slot rule lets m slots each at tau through (all right only tau^m)."""
    s = score.float().clamp(0.0, 1.0).masked_fill(~candidates, 0.0)
    order = s.argsort(dim=1, descending=True)
    cum = s.gather(1, order).cumprod(dim=1)
    keep = cum >= (tau if not torch.is_tensor(tau) else tau.to(cum.dtype))
    keep[:, 0] = True
    take = torch.zeros_like(candidates)
    take.scatter_(1, order, keep)
    return candidates & take


RULES = {"each": threshold_select, "joint": joint_select}


@dataclass(frozen=True)
class JointThreshold:
    """Fill the most confident candidates while the product of their confidences stays >= tau
    (`joint_select` on the raw confidence; always at least the most confident one)."""

    tau: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:  # also rejects NaN
            raise ValueError(f"threshold must lie in [0, 1], got {self.tau!r}")

    def select(
        self, conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext | None = None
    ) -> torch.Tensor:
        return joint_select(conf, candidates, self.tau)


@dataclass(frozen=True)
class Threshold:
    """Fill every candidate with confidence >= tau, and always the most confident one (progress)."""

    tau: float

    def select(
        self, conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext | None = None
    ) -> torch.Tensor:
        return threshold_select(conf, candidates, self.tau)


@dataclass(frozen=True)
class EvenSchedule:
    """Spread each row's masks evenly over `steps` forwards (remainder to the earliest steps) and
    fill the most confident slots first. n_masks and steps: ints, or (B,) tensors (one per row)."""

    n_masks: int | torch.Tensor
    steps: int | torch.Tensor

    def quota(self, step: int) -> torch.Tensor:
        n = torch.as_tensor(self.n_masks)
        s = torch.as_tensor(self.steps).clamp(min=1)
        q = n // s + (step < n % s).long()
        # Past the planned steps (only when a row must still finish), fill everything left.
        return torch.where(step < s, q, torch.full_like(q, 1 << 30)).clamp(min=1)

    def select(
        self, conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext | None = None
    ) -> torch.Tensor:
        n = self.quota(step).to(conf.device)
        n = n.reshape(-1, 1) if n.dim() else n
        scored = conf.masked_fill(~candidates, float("-inf"))
        order = scored.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return candidates & (rank < n)


@dataclass(frozen=True)
class Oracle:
    """Speed-of-light unmasking: given each row's AR greedy continuation (reference[row.index]),
    fill exactly the masked slots whose top-1 already equals it. When no slot of a row qualifies,
    fill its leftmost masked slot with the reference token (one token per forward, like AR), so
    the output stays equal to the reference and the count is a true ceiling for any policy over
    this denoiser (NLD's "SOL" analysis)."""

    reference: Sequence[Sequence[int]]

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext) -> torch.Tensor:
        if ctx is None:
            raise ValueError("the Oracle policy needs the PolicyContext")
        fill = torch.zeros_like(candidates)
        prop = ctx.proposal
        for b, row in enumerate(ctx.rows):
            cand = candidates[b].nonzero().flatten().tolist()
            if not cand:
                continue
            ref = self.reference[row.index]
            base = ctx.start[b] + 1
            hits = [i for i in cand if base + i < len(ref) and int(prop[b, i]) == ref[base + i]]
            if hits:
                fill[b, hits] = True
            else:
                i = cand[0]
                if base + i < len(ref):
                    prop[b, i] = ref[base + i]
                fill[b, i] = True
        return fill
