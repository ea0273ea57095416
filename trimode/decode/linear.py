"""Linear self-speculation: a bidirectional draft pass, then a causal verify pass of the same weights.

Cycle (nld-spec section 7, batched with ragged acceptance): the canvas is [next, d_1 .. d_{K-1}]
at positions length .. length+K-1, where `next` is the newest emitted token (not yet cached).
The draft forward fills d_i from [next, MASK x (K-1)] with the draft adapter on; the verify forward
runs the canvas causally with the adapter off and gives ar[i], the AR prediction after canvas[i].
Row b accepts the longest run with ar[i] == d_{i+1}, emits ar[0 .. c] (c accepted + 1 bonus),
commits canvas[0 .. c] and carries ar[c] as the next `next`. Every emitted token is an AR
prediction given the emitted prefix, so greedy output equals AR greedy output.

Improvement over the reference: the first draft is fused into the prefill forward (the prompt is
followed by K mask tokens that see it; the adapter acts on those tokens only), saving one forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import masks
from .common import (
    DRAFT,
    PREFILL,
    VERIFY,
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


def accept_greedy(drafts: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """Number of accepted drafts per row: the longest prefix with ar[:, i] == drafts[:, i].

    drafts: (B, n) proposals for the tokens after the canvas head; ar: (B, >= n) AR predictions,
    ar[:, i] being the verifier's token for the same slot as drafts[:, i]. Returns (B,) in [0, n].
    """
    n = drafts.shape[1]
    if n == 0:
        return torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device)
    match = (ar[:, :n] == drafts).long()
    return match.cumprod(dim=1).sum(dim=1)


def draft_pass(
    model: torch.nn.Module, cache, nxt: torch.Tensor, K: int, *, adapter: str | None
) -> torch.Tensor:
    """Bidirectional draft of K - 1 tokens after `nxt` (B,); reads the cache, commits nothing."""
    c = model.config
    dev = model.device
    B = nxt.shape[0]
    canvas = torch.full((B, K), c.mask_token_id, dtype=torch.long, device=dev)
    canvas[:, 0] = nxt
    S = int(cache.length.max()) + K
    positions = clamp_positions(cache.length[:, None] + torch.arange(K, device=dev)[None, :], c.max_seq_len)
    want = pred_slots(torch.arange(1, K, device=dev), c.dlm_type).expand(B, K - 1)
    logits = model(canvas, positions, mask=masks.with_prefix(masks.bidirectional(K, device=dev), cache.length, S),
                   cache=cache, adapter=adapter, logits_at=want)
    return exclude_mask(logits, c.mask_token_id).argmax(-1)  # (B, K-1)


def run(model: torch.nn.Module, rows: Rows, cfg: DecodeConfig) -> Iterator[Step]:
    c = model.config
    dev = model.device
    k = cfg.block_len
    adapter = adapter_for(model, cfg)
    cache = model.new_cache(rows.size, cache_capacity(rows, k))
    rows.forward(PREFILL)
    nxt, drafts = prefill(model, rows, cache, draft_len=k if k > 1 else 0, mask_id=c.mask_token_id, adapter=adapter)
    yield Step(PREFILL, [rows.emit(b, [int(nxt[b])]) for b in range(rows.size)])
    while rows.active():
        K = min(k, max(rows.remaining(b) for b in rows.active()))
        if K > 1:
            if drafts is None:
                drafted = rows.forward(DRAFT)
                drafts = draft_pass(model, cache, nxt, K, adapter=adapter)
                yield Step(DRAFT, [[] if b in drafted else None for b in range(rows.size)])
            drafts = apply_override(cfg, drafts[:, : K - 1], rows)
            canvas = torch.cat([nxt[:, None], drafts], dim=1)
        else:
            drafts = drafts[:, :0] if drafts is not None else torch.zeros(rows.size, 0, dtype=torch.long, device=dev)
            canvas = nxt[:, None]
        S = int(cache.length.max()) + K
        positions = clamp_positions(cache.length[:, None] + torch.arange(K, device=dev)[None, :], c.max_seq_len)
        logits = model(canvas, positions, mask=masks.with_prefix(masks.causal(K, device=dev), cache.length, S),
                       cache=cache)
        ar = exclude_mask(logits, c.mask_token_id).argmax(-1)  # (B, K)
        n_acc = accept_greedy(drafts, ar)  # (B,)
        verified = rows.forward(VERIFY)
        out: list[list[int] | None] = [None] * rows.size
        for b in verified:
            out[b] = rows.emit(b, ar[b, : int(n_acc[b]) + 1].tolist())
        # Only rows still decoding commit: a row that just finished may have accepted past its budget,
        # and growing its cache would make it overflow beside rows that keep writing full blocks.
        cache.commit(torch.where(rows.active_mask(dev), n_acc + 1, torch.zeros_like(n_acc)))
        nxt = ar.gather(1, n_acc[:, None]).squeeze(1)
        drafts = None
        yield Step(VERIFY, out)
