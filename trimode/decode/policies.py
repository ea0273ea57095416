"""Unmasking policies for diffusion mode: which masked slots to fill after a denoising forward.

A policy is a small object with `select(conf, candidates, step) -> fill`, all (B, n) tensors:
conf holds the confidence of each slot's proposal, candidates marks slots still masked (and rows
still denoising), fill marks the slots to fill now. Vectorised over the batch; no Python per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _top1(conf: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each row's single most confident candidate (rows without candidates select nothing)."""
    scored = conf.masked_fill(~candidates, float("-inf"))
    best = torch.zeros_like(candidates)
    best.scatter_(1, scored.argmax(dim=1, keepdim=True), True)
    return best & candidates


@dataclass(frozen=True)
class Threshold:
    """Fill every candidate with confidence >= tau, and always the most confident one (progress)."""

    tau: float

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        return (candidates & (conf >= self.tau)) | _top1(conf, candidates)


@dataclass(frozen=True)
class EvenSchedule:
    """Spread the block's masks evenly over `steps` forwards (remainder to the earliest steps) and
    fill the most confident slots first."""

    n_masks: int
    steps: int

    def quota(self, step: int) -> int:
        base, extra = divmod(self.n_masks, self.steps)
        return base + (1 if step < extra else 0)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        n = self.quota(step) if step < self.steps else candidates.shape[1]
        n = max(n, 1)
        scored = conf.masked_fill(~candidates, float("-inf"))
        order = scored.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return candidates & (rank < n)
