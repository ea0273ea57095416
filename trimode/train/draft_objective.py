"""The drafter's training objective as pure functions: the training forward's mask and inputs, and
the self-distillation loss (docs/design-notes.md §6; used by `trimode train-drafter`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import masks

DRAFT = "draft"


# -- masks and the training forward ---------------------------------------------------------
def draft_training_mask(L: int, anchors: torch.Tensor, K: int) -> torch.Tensor:
    """Boolean (B, L + n K, L + n K) mask over [x (L clean tokens) ; n draft blocks of K tokens].

    anchors: (B, n) position t of each block's first token. Clean tokens are causal among themselves
    (`masks.causal`) and never see blocks; block j sees itself bidirectionally (`masks.bidirectional`)
    and the clean tokens at positions < t_j: the inference draft mask `masks.with_prefix(
    masks.bidirectional(K), cache.length = t_j, ...)`, with the cache replaced by the clean stream.
    """
    B, n = anchors.shape
    dev = anchors.device
    T = L + n * K
    m = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    m[:, :L, :L] = masks.causal(L, device=dev)
    blk = torch.arange(n * K, device=dev) // K  # block index of each block token
    m[:, L:, L:] = (blk[:, None] == blk[None, :]) & masks.bidirectional(n * K, device=dev)
    t_of = anchors.repeat_interleave(K, dim=1)  # (B, nK): anchor of each block token's block
    m[:, L:, :L] = torch.arange(L, device=dev)[None, None, :] < t_of[:, :, None]
    return m


def draft_training_inputs(
    x: torch.Tensor, anchors: torch.Tensor, K: int, *, mask_id: int, max_seq_len: int,
    adapt_anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions, mask and adapter_tokens for one training forward.

    x: (B, L) clean sequences; anchors: (B, n). Block j is [x[t_j], MASK x (K-1)] at positions
    t_j .. t_j+K-1. adapt_anchor: optional (B, n) bool, whether the adapter acts on the anchor token
    (default: yes, as in the linear draft pass). Returns tokens (B, T), positions (B, T), mask
    (B, T, T), adapter_tokens (B, T) with T = L + n K.
    """
    B, L = x.shape
    n = anchors.shape[1]
    dev = x.device
    blocks = torch.full((B, n, K), mask_id, dtype=torch.long, device=dev)
    blocks[:, :, 0] = x.gather(1, anchors)
    tokens = torch.cat([x, blocks.view(B, n * K)], dim=1)
    bpos = (anchors[:, :, None] + torch.arange(K, device=dev)).view(B, n * K)
    positions = torch.cat([torch.arange(L, device=dev).expand(B, L), bpos], dim=1).clamp(max=max_seq_len - 1)
    adapt = torch.ones(B, n, K, dtype=torch.bool, device=dev)
    if adapt_anchor is not None:
        adapt[:, :, 0] = adapt_anchor
    adapter_tokens = torch.cat([torch.zeros(B, L, dtype=torch.bool, device=dev), adapt.view(B, n * K)], dim=1)
    return tokens, positions, draft_training_mask(L, anchors, K), adapter_tokens


def drafter_loss(
    model: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor, anchors: torch.Tensor, K: int, *,
    kl_weight: float = 0.5, ce_weight: float = 1.0, adapt_anchor: torch.Tensor | None = None,
    adapter: str = DRAFT,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Self-distillation loss of the draft adapter on one micro-batch.

    x: (B, L) prompt + AR greedy continuation; valid: (B, L) bool, positions whose token is an AR
    greedy target (the continuation, EOS included); anchors: (B, n) block starts (a block whose
    targets are all invalid contributes nothing). Slot i >= 1 of the block anchored at t predicts
    x[t + i] (llada: from its own logits; dream: from slot i - 1); the teacher is the clean stream's
    causal distribution at t + i - 1. Returns the loss and {ce, kl, acc1, n} for logging.
    """
    c = model.config
    B, L = x.shape
    n = anchors.shape[1]
    dev = x.device
    tokens, positions, mask, adapter_tokens = draft_training_inputs(
        x, anchors, K, mask_id=c.mask_token_id, max_seq_len=c.max_seq_len, adapt_anchor=adapt_anchor)
    i = torch.arange(1, K, device=dev)
    tgt = anchors[:, :, None] + i  # (B, n, K-1) target positions
    in_seq = tgt < L
    tgt_c = tgt.clamp(max=L - 1)
    ok = in_seq & valid.gather(1, tgt_c.view(B, -1)).view(B, n, K - 1)
    shift = 0 if c.dlm_type == "llada" else 1
    slot = L + torch.arange(n, device=dev)[:, None] * K + i[None, :] - shift  # (n, K-1) draft logit slots
    teacher_at = (tgt_c - 1).view(B, -1)  # clean logit predicting x[t+i]
    want = torch.cat([slot.reshape(1, -1).expand(B, -1), teacher_at], dim=1)
    logits = model(tokens, positions, mask=mask, adapter=adapter, adapter_tokens=adapter_tokens,
                   logits_at=want).float()
    m = n * (K - 1)
    draft, teacher = logits[:, :m], logits[:, m:].detach()
    labels = x.gather(1, tgt_c.view(B, -1))
    sel = ok.view(B, -1)
    cnt = sel.sum().clamp_min(1)
    if c.mask_token_id is not None:  # the mask id is never drafted (decoders exclude it)
        draft = draft.clone()
        draft[..., c.mask_token_id] = -1e4
    logp = F.log_softmax(draft, -1)
    ce = -(logp.gather(-1, labels[..., None]).squeeze(-1) * sel).sum() / cnt
    loss = ce_weight * ce
    kl = torch.zeros((), device=dev)
    if kl_weight:
        logq = F.log_softmax(teacher, -1)
        kl = ((logq.exp() * (logq - logp)).sum(-1) * sel).sum() / cnt
        loss = loss + kl_weight * kl
    with torch.no_grad():
        hit = (draft.argmax(-1) == labels) & sel
        acc1 = float(hit.sum() / cnt)
        # Expected accepted drafts per block: the longest all-correct prefix of each block.
        run = (hit | ~sel).view(B, n, K - 1).long().cumprod(-1) * ok.view(B, n, K - 1).long()
        blocks = ok[:, :, 0].sum().clamp_min(1)
        acc_len = float(run.sum() / blocks)
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach()), "acc1": acc1, "accepted": acc_len, "n": int(cnt)}
