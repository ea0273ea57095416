"""Quadratic self-speculation: draft and verify fused in one forward per cycle (nld-spec section 9).

The input is K sub-blocks S_j = [d_j, MASK x K], j = 0..K-1, where d_0 is the newest emitted token
(not yet cached) and d_1..d_{K-1} are the drafts. Slot i of S_j sits at position length + j + i.
Under `masks.quadratic` each head d_j sees the cache and d_0..d_j only, so its logits are the AR
verifier's prediction after d_j and its K/V are exact cache entries; the mask slots of S_j see S_j
bidirectionally and draft the K tokens after d_j. Row b accepts d_i while the head before it
predicted it; with n_ok heads correct it emits ar[0 .. n_ok-1] (accepted drafts + the bonus),
compacts the heads' K/V into the cache and takes the next drafts from sub-block n_ok - 1.

Improvements over the reference: batched with ragged acceptance; the draft adapter acts on mask
slots only (heads stay on base weights, so greedy output equals AR even with the adapter); the
first drafts come from the prefill forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import masks
from .common import (
    PREFILL,
    QUADRATIC,
    DecodeConfig,
    Rows,
    Step,
    adapter_for,
    apply_override,
    cache_capacity,
    clamp_positions,
    exclude_mask,
    pred_slots,
    prefill,
)
from .linear import accept_greedy


def run(model: torch.nn.Module, rows: Rows, cfg: DecodeConfig) -> Iterator[Step]:
    c = model.config
    dev = model.device
    k = cfg.block_len
    adapter = adapter_for(model, cfg)
    cache = model.new_cache(rows.size, cache_capacity(rows, k * (k + 1)))
    rows.forward(PREFILL)
    nxt, drafts = prefill(model, rows, cache, draft_len=k if k > 1 else 0, mask_id=c.mask_token_id, adapter=adapter)
    yield Step(PREFILL, [rows.emit(b, [int(nxt[b])]) for b in range(rows.size)])
    B = rows.size
    while rows.active():
        K = min(k, max(rows.remaining(b) for b in rows.active()))
        n = K + 1
        if drafts is None:
            drafts = torch.zeros(B, 0, dtype=torch.long, device=dev)
        drafts = apply_override(cfg, drafts[:, : K - 1], rows)
        heads = torch.cat([nxt[:, None], drafts], dim=1)  # (B, K): d_0 .. d_{K-1}
        tokens = torch.full((B, K, n), c.mask_token_id, dtype=torch.long, device=dev)
        tokens[:, :, 0] = heads
        tokens = tokens.view(B, K * n)
        offs = masks.quadratic_positions(K, device=dev)
        positions = clamp_positions(cache.length[:, None] + offs[None, :], c.max_seq_len)
        S = int(cache.length.max()) + K * n
        # Logits wanted: the K heads, then for each sub-block the K-1 drafts after its bonus
        # (mask slots 2..K of S_j predict positions j+2 .. j+K).
        j = torch.arange(K, device=dev)
        head_slots = j * n
        if K > 1:
            draft_slots = pred_slots(j[:, None] * n + torch.arange(2, n, device=dev)[None, :], c.dlm_type).reshape(-1)
        else:
            draft_slots = torch.zeros(0, dtype=torch.long, device=dev)
        want = torch.cat([head_slots, draft_slots]).expand(B, -1)
        is_mask_slot = (torch.arange(K * n, device=dev) % n > 0)[None, :].expand(B, -1)
        logits = model(tokens, positions, mask=masks.with_prefix(masks.quadratic(K, device=dev), cache.length, S),
                       cache=cache, adapter=adapter, adapter_tokens=is_mask_slot, logits_at=want)
        pred = exclude_mask(logits, c.mask_token_id).argmax(-1)  # (B, K + K(K-1))
        ar = pred[:, :K]  # ar[:, j]: AR prediction after d_j
        sub_drafts = pred[:, K:].view(B, K, K - 1)  # sub_drafts[:, j]: drafts after ar[:, j]
        n_ok = accept_greedy(drafts, ar) + 1  # heads d_0 .. d_{n_ok-1} are correct
        stepped = rows.forward(QUADRATIC)
        out: list[list[int] | None] = [None] * B
        for b in stepped:
            out[b] = rows.emit(b, ar[b, : int(n_ok[b])].tolist())
        # Only rows still decoding keep their heads (see linear.py: finished rows must not grow).
        cache.compact(head_slots.expand(B, K), torch.where(rows.active_mask(dev), n_ok, torch.zeros_like(n_ok)))
        last = (n_ok - 1)[:, None]
        nxt = ar.gather(1, last).squeeze(1)
        drafts = sub_drafts.gather(1, last[:, :, None].expand(B, 1, K - 1)).squeeze(1)
        yield Step(QUADRATIC, out)
