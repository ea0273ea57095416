"""The joint AR + diffusion objective as pure functions (docs/design-notes.md §3).

One forward over the dual-stream input [x_t ; x_0] (length 2L, shared positions 0..L-1) gives the
diffusion logits (first half) and the AR logits (second half). Every loss returns a (sum, count)
pair so the trainer can all-reduce both across ranks and micro-batches before dividing
("global loss averaging").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..masks import dual_stream

DLM_TYPES = ("llada", "dream")


def dual_stream_inputs(
    xt: torch.Tensor, x0: torch.Tensor, block_lens: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (B, 2L) = [x_t ; x_0], positions (B, 2L) = [0..L-1 ; 0..L-1] and the boolean training
    mask (B, 2L, 2L) (True = may attend), one block length per row."""
    if xt.shape != x0.shape or xt.dim() != 2:
        raise ValueError(f"xt {tuple(xt.shape)} and x0 {tuple(x0.shape)} must be equal (B, L)")
    B, L = x0.shape
    if len(block_lens) != B:
        raise ValueError(f"{len(block_lens)} block lengths for a batch of {B}")
    tokens = torch.cat([xt, x0], dim=1)
    pos = torch.arange(L, device=x0.device)
    positions = torch.cat([pos, pos])[None, :].expand(B, 2 * L)
    cache: dict[int, torch.Tensor] = {}
    for bl in block_lens:
        if bl not in cache:
            cache[bl] = dual_stream(L, bl, device=x0.device)
    mask = torch.stack([cache[bl] for bl in block_lens])
    return tokens, positions, mask


def split_dual(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2L, V) -> noisy-stream logits (B, L, V), clean-stream logits (B, L, V)."""
    if logits.dim() != 3 or logits.shape[1] % 2 != 0:
        raise ValueError(f"dual-stream logits must be (B, 2L, V), got {tuple(logits.shape)}")
    L = logits.shape[1] // 2
    return logits[:, :L], logits[:, L:]


def diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    p: torch.Tensor,
    *,
    dlm_type: str = "llada",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over masked i of CE(logits at i, x0[i]) / p[i], and the number of terms.

    logits: (B, L, V) noisy-stream logits; x0: (B, L); masked: (B, L) bool; p: (B, L) mask rate.
    `llada` predicts a masked token at its own position; `dream` predicts it from the position
    before it (logits[i-1] -> x0[i]), so a masked token at position 0 is not scored.
    """
    if dlm_type not in DLM_TYPES:
        raise ValueError(f"dlm_type must be one of {DLM_TYPES}, got {dlm_type!r}")
    if dlm_type == "dream":
        logits, x0, masked, p = logits[:, :-1], x0[:, 1:], masked[:, 1:], p[:, 1:]
    sel = masked.bool()
    count = sel.sum()
    if int(count) == 0:
        return logits.sum() * 0.0, count
    ce = F.cross_entropy(logits[sel].float(), x0[sel], reduction="none")
    return (ce / p[sel].to(ce.dtype)).sum(), count


def ar_loss(
    logits: torch.Tensor, x0: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over i < L-1 of CE(clean logits at i, x0[i+1]) where the label x0[i+1] is supervised.

    logits: (B, L, V); x0: (B, L); loss_mask: (B, L) bool over labels (None: all supervised).
    Returns (sum, count).
    """
    lg = logits[:, :-1]
    labels = x0[:, 1:]
    sel = torch.ones_like(labels, dtype=torch.bool) if loss_mask is None else loss_mask[:, 1:].bool()
    count = sel.sum()
    if int(count) == 0:
        return logits.sum() * 0.0, count
    ce = F.cross_entropy(lg[sel].float(), labels[sel], reduction="sum")
    return ce, count


def combine(
    ar_sum: torch.Tensor,
    ar_count: torch.Tensor | float,
    diff_sum: torch.Tensor,
    diff_count: torch.Tensor | float,
    *,
    alpha: float,
) -> torch.Tensor:
    """L = L_AR + alpha * L_diff with each term divided by its *global* count (clamped to >= 1)."""
    ar_n = torch.as_tensor(ar_count, dtype=torch.float32).clamp_min(1.0)
    diff_n = torch.as_tensor(diff_count, dtype=torch.float32).clamp_min(1.0)
    return ar_sum / ar_n + alpha * diff_sum / diff_n
