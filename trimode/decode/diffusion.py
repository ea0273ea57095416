"""Block diffusion with a causal prefix cache (nld-spec section 6, causal_context = True).

Per block: the canvas is [seed, MASK x (K-1)], seed being the AR prediction of the next token.
Denoising forwards run the canvas bidirectionally against the cached prefix (writing nothing
permanent) and fill masked slots chosen by the policy; the mask id is never proposed. A row whose
canvas holds an EOS (or stop token) with every slot before it filled stops denoising. The finished
block is emitted, then one causal forward over it commits its K/V and predicts the next seed.
The prefill is counted as a forward (it produces the first seed); the trailing commit of the last
block is skipped when no row needs another token. In a batch, rows denoise their blocks together,
but a row is charged (a DENOISE trace entry) only for the forwards in which it still had masked
slots to fill: once its block is complete, or it stopped at its own EOS, it merely waits for the
batch's commit forward, so its counters equal those of the row decoded alone.

Sampling (docs/sampling.md; not AR-equivalent): a sampled row's seed is a sample from its processed
distribution; at every denoising forward each of its masked slots proposes a sample from the slot's
processed distribution, with confidence = that sample's processed probability, and the policy
chooses among these proposals as it does among argmaxes. Draws are fresh uniforms from the row's
generator, taken only for rows with slots left to fill, so a row's output is batch-independent.
"""

from __future__ import annotations

import torch

from .. import masks
from ..sampling import sample
from .batch import Decoder
from .common import (
    COMMIT,
    DENOISE,
    EMIT,
    PREFILL,
    Row,
    Step,
    active_mask,
    clamp_positions,
    exclude_mask,
    pred_slots,
    prefill,
    record,
)
from .policies import EvenSchedule, PolicyContext, Threshold


def finished_prefix(canvas: torch.Tensor, filled: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """(B,) rows whose canvas has a stop/EOS token with every slot up to it filled.

    stop: (B, V) bool, the stop ids of each row."""
    is_stop = filled & stop.gather(1, canvas)
    # filled_upto[b, i]: slots 0..i all filled.
    filled_upto = filled.long().cumprod(dim=1).bool()
    return (is_stop & filled_upto).any(dim=1)


class DiffusionDecoder(Decoder):
    """One cycle = one block for every running row (rows join and leave between blocks)."""

    mode = "diffusion"

    def scratch(self) -> int:
        return self.cfg.block_len

    def _prefill(self, rows: list[Row], cache) -> tuple[list[Step], dict[str, torch.Tensor]]:
        record(rows, PREFILL)
        seed, _, _ = prefill(self.model, rows, cache, mask_id=self.model.config.mask_token_id,
                             sampler=self.sampler(rows), fresh=True)
        # seed_credit: trace index of the forward that produced each row's seed.
        credit = torch.tensor([len(r.trace) - 1 for r in rows], dtype=torch.long)
        return [Step(PREFILL, [[] for _ in rows], rows)], {"seed": seed, "seed_credit": credit}

    def _policy(self, n_masks: torch.Tensor):
        cfg = self.cfg
        if cfg.policy is not None:
            return cfg.policy
        if cfg.threshold is not None:
            return Threshold(cfg.threshold)
        return EvenSchedule(n_masks, torch.full_like(n_masks, cfg.steps) if cfg.steps else n_masks.clamp(min=1))

    def _cycle(self) -> list[Step]:
        model, cache, rows = self.model, self.cache, list(self.running)
        c = model.config
        dev = model.device
        mask_id = c.mask_token_id
        B = len(rows)
        seed = self.state["seed"]
        stop_ids = sorted(set().union(*(r.stop_ids for r in rows)))
        steps: list[Step] = []
        # Each row's block is as long as it would be alone (its last block may be shorter); shorter
        # blocks are padded, and the padding is invisible to every real slot, so batching changes no token.
        Kb = torch.tensor([min(self.cfg.block_len, r.remaining()) for r in rows], dtype=torch.long, device=dev)
        K = int(Kb.max())
        ar_k = torch.arange(K, device=dev)
        valid = ar_k[None, :] < Kb[:, None]  # (B, K)
        canvas = torch.full((B, K), mask_id, dtype=torch.long, device=dev)
        canvas[:, 0] = seed
        filled = ~valid
        filled[:, 0] = True
        credit = torch.full((B, K), -1, dtype=torch.long)
        credit[:, 0] = self.state["seed_credit"]
        denoising = active_mask(rows, dev)
        policy = self._policy(Kb - 1)
        start = [len(r.tokens) for r in rows]
        positions = clamp_positions(cache.length[:, None] + ar_k[None, :], c.max_seq_len)
        S = int(cache.length.max()) + K
        eye = torch.eye(K, dtype=torch.bool, device=dev)[None]
        see = valid[:, None, :] | eye  # padding slots are keys for nobody but themselves
        bidir = masks.with_prefix(masks.bidirectional(K, device=dev)[None] & see, cache.length, S)
        want = pred_slots(torch.arange(1, K, device=dev), c.dlm_type).expand(B, K - 1)
        # A row stops denoising once a stop id of *its own* sits in a filled prefix of its canvas.
        own_stop = torch.zeros(B, c.vocab_size, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            if r.stop_ids:
                own_stop[i, sorted(r.stop_ids)] = True
        sampler = self.sampler(rows)
        step = 0
        while True:
            if stop_ids:
                denoising &= ~finished_prefix(canvas, filled, own_stop)
            candidates = ~filled[:, 1:] & denoising[:, None]
            if not bool(candidates.any()):
                break
            logits = model(canvas, positions, mask=bidir, cache=cache, logits_at=want)
            probs = exclude_mask(logits.float(), mask_id).softmax(-1)
            conf, proposal = probs.max(-1)  # (B, K-1)
            if sampler.any:
                # Sampled rows: a sample per masked slot, confident as its processed probability.
                sp = sampler.probs(exclude_mask(logits, mask_id))
                u = sampler.fresh(K - 1, only=candidates.any(1), counts=(Kb - 1).tolist())  # own block only
                drawn = sample(sp, u)
                pick = sampler.sampled[:, None]
                proposal = torch.where(pick, drawn, proposal)
                conf = torch.where(pick, sp.gather(-1, drawn[..., None]).squeeze(-1).to(conf.dtype), conf)
                probs = torch.where(pick[..., None], sp.to(probs.dtype), probs)
            ctx = PolicyContext(proposal=proposal, probs=probs, filled=filled, rows=rows, start=start)
            fill = policy.select(conf, candidates, step, ctx) & candidates
            # A policy may rewrite ctx.proposal (the oracle forces the AR token when nothing matches).
            canvas[:, 1:] = torch.where(fill, ctx.proposal, canvas[:, 1:])
            filled[:, 1:] |= fill
            # Only rows with masked slots left took part: a row whose block is complete (or that
            # stopped at its own EOS) rides along, waiting for the batch's commit, as if it had left.
            took_part = record(rows, DENOISE, only=candidates.any(1).tolist())
            for i in took_part:
                credit[i, 1:][fill[i].cpu()] = len(rows[i].trace) - 1
            step += 1
            steps.append(Step(DENOISE, [[] if i in took_part else None for i in range(B)], rows))
        out: list[list[int] | None] = [None] * B
        for i, r in enumerate(rows):
            if not r.done:
                kb = int(Kb[i])
                out[i] = r.emit(canvas[i, :kb].tolist(), credit=credit[i, :kb].tolist())
        # The block's tokens are handed out without a forward (they were finalised by the denoising
        # forwards credited above); the commit forward below only involves rows still decoding.
        steps.append(Step(EMIT, out, rows))
        if all(r.done for r in rows):
            return steps  # nothing left to decode: the final commit is not needed
        # Commit: causal forward over the finished canvas writes the block's K/V and predicts the next seed.
        causal = masks.with_prefix(masks.causal(K, device=dev), cache.length, S)
        logits = model(canvas, positions, mask=causal, cache=cache, logits_at=(Kb - 1)[:, None])
        cache.commit(torch.where(active_mask(rows, dev), Kb, 0))
        committed = record(rows, COMMIT)
        if sampler.any:
            u = sampler.fresh(1, only=active_mask(rows))[:, 0]
            self.state["seed"], _ = sampler.choose(exclude_mask(logits[:, 0], mask_id), u)
        else:
            self.state["seed"] = exclude_mask(logits[:, 0], mask_id).argmax(-1)
        seed_credit = self.state["seed_credit"].clone()
        for i in committed:
            seed_credit[i] = len(rows[i].trace) - 1
        self.state["seed_credit"] = seed_credit
        steps.append(Step(COMMIT, [[] if i in committed else None for i in range(B)], rows))
        return steps
