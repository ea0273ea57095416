"""Block diffusion with a causal prefix cache (nld-spec section 6, causal_context = True).

Per block: the canvas is [seed, MASK x (K-1)], seed being the AR prediction of the next token.
Denoising forwards run the canvas bidirectionally against the cached prefix (writing nothing
permanent) and fill masked slots chosen by the policy; the mask id is never proposed. A row whose
canvas holds an EOS (or stop token) with every slot before it filled stops denoising. The finished
block is emitted, then one causal forward over it commits its K/V and predicts the next seed.
The prefill is counted as a forward (it produces the first seed); the trailing commit of the last
block is skipped when no row needs another token.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import masks
from .common import (
    COMMIT,
    DENOISE,
    EMIT,
    PREFILL,
    DecodeConfig,
    Rows,
    Step,
    cache_capacity,
    clamp_positions,
    exclude_mask,
    pred_slots,
    prefill,
)
from .policies import EvenSchedule, Threshold


def finished_prefix(canvas: torch.Tensor, filled: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """(B,) rows whose canvas has a stop/EOS token with every slot up to it filled."""
    is_stop = filled & torch.isin(canvas, stop)
    # filled_upto[b, i]: slots 0..i all filled.
    filled_upto = filled.long().cumprod(dim=1).bool()
    return (is_stop & filled_upto).any(dim=1)


def run(model: torch.nn.Module, rows: Rows, cfg: DecodeConfig) -> Iterator[Step]:
    c = model.config
    dev = model.device
    mask_id = c.mask_token_id
    cache = model.new_cache(rows.size, cache_capacity(rows, cfg.block_len))
    B = rows.size
    rows.forward(PREFILL)
    seed, _ = prefill(model, rows, cache, mask_id=mask_id)
    seed_credit = [0] * B  # trace index of the forward that produced each row's seed
    stop = torch.tensor(sorted(rows.stop_ids) or [-1], dtype=torch.long, device=dev)
    yield Step(PREFILL, [[] for _ in range(B)])
    while rows.active():
        K = min(cfg.block_len, max(rows.remaining(b) for b in rows.active()))
        canvas = torch.full((B, K), mask_id, dtype=torch.long, device=dev)
        canvas[:, 0] = seed
        filled = torch.zeros(B, K, dtype=torch.bool, device=dev)
        filled[:, 0] = True
        credit = torch.full((B, K), -1, dtype=torch.long)
        credit[:, 0] = torch.tensor(seed_credit)
        denoising = rows.active_mask(dev)
        policy = (
            Threshold(cfg.threshold) if cfg.threshold is not None
            else EvenSchedule(K - 1, cfg.steps or max(K - 1, 1))
        )
        positions = clamp_positions(cache.length[:, None] + torch.arange(K, device=dev)[None, :], c.max_seq_len)
        S = int(cache.length.max()) + K
        bidir = masks.with_prefix(masks.bidirectional(K, device=dev), cache.length, S)
        want = pred_slots(torch.arange(1, K, device=dev), c.dlm_type).expand(B, K - 1)
        step = 0
        while True:
            denoising &= ~finished_prefix(canvas, filled, stop)
            candidates = ~filled[:, 1:] & denoising[:, None]
            if not bool(candidates.any()):
                break
            logits = model(canvas, positions, mask=bidir, cache=cache, logits_at=want)
            probs = exclude_mask(logits.float(), mask_id).softmax(-1)
            conf, proposal = probs.max(-1)  # (B, K-1)
            fill = policy.select(conf, candidates, step)
            canvas[:, 1:] = torch.where(fill, proposal, canvas[:, 1:])
            filled[:, 1:] |= fill
            # Rows already finished denoising ride along in the batch but did not need this forward.
            took_part = rows.forward(DENOISE, only=denoising.nonzero().flatten().tolist())
            for b in took_part:
                credit[b, 1:][fill[b].cpu()] = len(rows.trace[b]) - 1
            step += 1
            yield Step(DENOISE, [[] if b in took_part else None for b in range(B)])
        out: list[list[int] | None] = [None] * B
        emitting = rows.active()
        for b in emitting:
            out[b] = rows.emit(b, canvas[b].tolist(), credit=credit[b].tolist())
        if not rows.active():
            yield Step(EMIT, out)  # nothing left to decode: the final commit is not needed
            break
        # Commit: causal forward over the finished canvas writes the block's K/V.
        causal = masks.with_prefix(masks.causal(K, device=dev), cache.length, S)
        logits = model(canvas, positions, mask=causal, cache=cache, logits_at=torch.full((B, 1), K - 1, device=dev))
        active = rows.active_mask(dev)
        cache.commit(torch.where(active, K, 0))
        committed = rows.forward(COMMIT)
        seed = exclude_mask(logits[:, 0], mask_id).argmax(-1)
        for b in committed:
            seed_credit[b] = len(rows.trace[b]) - 1
        yield Step(COMMIT, out)
