"""Block diffusion with a causal prefix cache (NLD's block diffusion with a causal context; docs/design-notes.md).

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

from dataclasses import dataclass

import torch

from .. import masks
from ..cache import KVCache
from .batch import Decoder, State, exclude_mask, pred_slots, prefill
from .policies import EvenSchedule, PolicyContext, Threshold
from .rows import COMMIT, DENOISE, EMIT, PREFILL, Row, Step


def finished_prefix(canvas: torch.Tensor, filled: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """(B,) rows whose canvas has a stop/EOS token with every slot up to it filled.

    stop: (B, V) bool, the stop ids of each row."""
    is_stop = filled & stop.gather(1, canvas)
    # filled_upto[b, i]: slots 0..i all filled.
    filled_upto = filled.long().cumprod(dim=1).bool()
    return (is_stop & filled_upto).any(dim=1)


@dataclass
class DiffusionState(State):
    seed: torch.Tensor  # (B,) the AR prediction of the next block's first token
    seed_credit: torch.Tensor  # (B,) index in the row's trace of the forward that produced it


class DiffusionDecoder(Decoder):
    """One cycle = one block for every running row (rows join and leave between blocks)."""

    def scratch(self) -> int:
        return self.cfg.block_len

    def _prefill(self, rows: list[Row], cache: KVCache) -> tuple[list[Step], DiffusionState]:
        seed, _, _ = prefill(self, rows, cache, self.sampler(rows), fresh=True)
        step = self.finish(PREFILL, rows=rows)
        credit = torch.tensor([len(r.trace) - 1 for r in rows], dtype=torch.long)
        return [step], DiffusionState(seed, credit)

    def _policy(self, n_masks: torch.Tensor):
        cfg = self.cfg
        if cfg.policy is not None:
            return cfg.policy
        if cfg.threshold is not None:
            return Threshold(cfg.threshold)
        return EvenSchedule(n_masks, torch.full_like(n_masks, cfg.steps) if cfg.steps else n_masks.clamp(min=1))

    def _cycle(self) -> list[Step]:
        rows, dev = self.running, self.dev
        # Each row's block is as long as it would be alone (its last block may be shorter); shorter
        # blocks are padded, and the padding is invisible to every real slot, so batching changes no token.
        Kb = torch.tensor([min(self.cfg.block_len, r.remaining()) for r in rows], dtype=torch.long, device=dev)
        K = int(Kb.max())
        canvas = torch.full((len(rows), K), self.c.mask_token_id, dtype=torch.long, device=dev)  # [seed, MASK..]
        canvas[:, 0] = self.state.seed
        credit = torch.full((len(rows), K), -1, dtype=torch.long)  # (B, K): trace index that finalised a slot
        credit[:, 0] = self.state.seed_credit
        positions = self.positions(torch.arange(K, device=dev))
        steps = self._denoise(canvas, credit, Kb, positions)
        # A thinking budget may cut a row's block at a forced token; the commit forward then writes
        # only the kept prefix and predicts the next seed after it.
        forced, Kb = self.force(canvas, Kb)
        canvas[:, :] = forced
        # The block's tokens are handed out without a forward (they were finalised by the denoising
        # forwards credited above); the commit forward below only involves rows still decoding.
        out = [None if r.done else r.emit(canvas[i, : int(Kb[i])].tolist(), credit=credit[i, : int(Kb[i])].tolist())
               for i, r in enumerate(rows)]
        steps.append(Step(EMIT, out, rows))
        if all(r.done for r in rows):
            return steps  # nothing left to decode: the final commit is not needed
        return steps + [self._commit(canvas, Kb, positions)]

    def _denoise(self, canvas: torch.Tensor, credit: torch.Tensor, Kb: torch.Tensor,
                 positions: torch.Tensor) -> list[Step]:
        """Fill the masked slots of `canvas` (B, K) in place, forward by forward, recording in
        `credit` which forward finalised each slot; returns the DENOISE steps."""
        rows, c, dev, sampler = self.running, self.c, self.dev, self.sampler()
        B, K = canvas.shape
        valid = torch.arange(K, device=dev)[None, :] < Kb[:, None]  # (B, K)
        filled = ~valid  # (B, K): slots that need no more denoising (the seed, the padding)
        filled[:, 0] = True
        see = valid[:, None, :] | torch.eye(K, dtype=torch.bool, device=dev)[None]  # padding: seen by itself only
        bidir = self.prefix_mask(masks.bidirectional(K, device=dev)[None] & see)  # (B, K, S)
        want = pred_slots(torch.arange(1, K, device=dev), c.dlm_type).expand(B, K - 1)
        own_stop = torch.zeros(B, c.vocab_size, dtype=torch.bool, device=dev)  # (B, V): each row's stop ids
        for i, r in enumerate(rows):
            if r.stop_ids:
                own_stop[i, sorted(r.stop_ids)] = True
        any_stop, policy, start = bool(own_stop.any()), self._policy(Kb - 1), self.starts()
        denoising = torch.tensor([not r.done for r in rows], dtype=torch.bool, device=dev)
        steps: list[Step] = []
        while True:
            if any_stop:  # a row stops denoising once one of its stop ids sits in a filled prefix
                denoising &= ~finished_prefix(canvas, filled, own_stop)
            candidates = ~filled[:, 1:] & denoising[:, None]  # (B, K-1)
            if not bool(candidates.any()):
                return steps
            logits = exclude_mask(self.model(canvas, positions, mask=bidir, cache=self.cache, logits_at=want),
                                  c.mask_token_id)
            u = sampler.fresh(K - 1, only=candidates.any(1), counts=(Kb - 1).tolist())  # own block only
            proposal, conf, probs = sampler.propose(logits, u)  # (B, K-1), (B, K-1), (B, K-1, V)
            ctx = PolicyContext(proposal=proposal, probs=probs, filled=filled, rows=rows, start=start)
            fill = policy.select(conf, candidates, len(steps), ctx) & candidates
            # A policy may rewrite ctx.proposal (the oracle forces the AR token when nothing matches).
            canvas[:, 1:] = torch.where(fill, ctx.proposal, canvas[:, 1:])
            filled[:, 1:] |= fill
            # Only rows with masked slots left take part: a row whose block is complete (or that
            # stopped at its own EOS) rides along, waiting for the batch's commit, as if it had left.
            steps.append(self.finish(DENOISE, only=candidates.any(1)))
            for i, took in enumerate(steps[-1].new_tokens):
                if took is not None:
                    credit[i, 1:][fill[i].cpu()] = len(rows[i].trace) - 1

    def _commit(self, canvas: torch.Tensor, Kb: torch.Tensor, positions: torch.Tensor) -> Step:
        """A causal forward over the finished canvas: writes the block's K/V, predicts the next seed."""
        rows, sampler = self.running, self.sampler()
        logits = self.model(canvas, positions, mask=self.prefix_mask(masks.causal(canvas.shape[1], device=self.dev)),
                            cache=self.cache, logits_at=(Kb - 1)[:, None])
        self.cache.commit(self.only_active(Kb))
        alive = torch.tensor([not r.done for r in rows], dtype=torch.bool)
        seed, _ = sampler.choose(exclude_mask(logits[:, 0], self.c.mask_token_id), sampler.fresh(1, only=alive)[:, 0])
        step = self.finish(COMMIT)
        seed_credit = torch.tensor([len(r.trace) - 1 for r in rows], dtype=torch.long)
        self.state = DiffusionState(seed, torch.where(alive, seed_credit, self.state.seed_credit))
        return step
