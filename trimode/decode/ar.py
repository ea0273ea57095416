"""Autoregressive decoding: a causal prefill, then one token per causal forward."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import masks
from .common import AR_STEP, PREFILL, DecodeConfig, Rows, Step, cache_capacity, clamp_positions, exclude_mask, prefill


def run(model: torch.nn.Module, rows: Rows, cfg: DecodeConfig) -> Iterator[Step]:
    c = model.config
    dev = model.device
    cache = model.new_cache(rows.size, cache_capacity(rows, 1))
    rows.forward(PREFILL)
    nxt, _ = prefill(model, rows, cache, mask_id=c.mask_token_id)
    yield Step(PREFILL, [rows.emit(b, [int(nxt[b])]) for b in range(rows.size)])
    inner = masks.causal(1, device=dev)
    while rows.active():
        active = rows.active_mask(dev)
        S = int(cache.length.max()) + 1
        positions = clamp_positions(cache.length[:, None], c.max_seq_len)
        logits = model(nxt[:, None], positions, mask=masks.with_prefix(inner, cache.length, S), cache=cache)
        cache.commit(active.long())
        stepped = rows.forward(AR_STEP)
        nxt = exclude_mask(logits[:, -1], c.mask_token_id).argmax(-1)
        out: list[list[int] | None] = [None] * rows.size
        for b in stepped:
            out[b] = rows.emit(b, [int(nxt[b])])
        yield Step(AR_STEP, out)
