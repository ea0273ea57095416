"""Quadratic self-speculation: draft and verify fused in one forward per cycle.

The input is K sub-blocks S_j = [d_j, MASK x K], j = 0..K-1, where d_0 is the newest emitted token
(not yet cached) and d_1..d_{K-1} are the drafts. Slot i of S_j sits at position length + j + i.
Under `masks.quadratic` each head d_j sees the cache and d_0..d_j only, so its logits are the AR
verifier's prediction after d_j and its K/V are exact cache entries; the mask slots of S_j see S_j
bidirectionally and draft the K tokens after d_j. Row b accepts d_i while the head before it
predicted it; with n heads correct it emits the verifier's tokens after d_0 .. d_{n-1} (accepted
drafts + the bonus), compacts the heads' K/V into the cache and takes the next drafts from
sub-block n - 1 (NLD's quadratic speculation; see docs/design-notes.md).

Improvements over the reference: batched with ragged acceptance; the draft adapter acts on mask
slots only (heads stay on base weights, so greedy output equals AR even with the adapter); the
first drafts come from the prefill forward; the output head runs on the K heads and the chosen
sub-block's K - 1 drafts only (2K - 1 rows, not K + K(K - 1)).

Sampling (docs/sampling.md): the heads' logits are the verifier's p; the chosen sub-block's mask
slots are sampled independently from their processed marginals (token t's draft uniform). Its
distributions depend only on d_0..d_j, all emitted once it is chosen, so `rejection` is valid here
too. While a row verifies by rejection, cycles use a full block_len.
"""

from __future__ import annotations

import torch

from .. import masks
from ..cache import KVCache
from ..sampling import U_DRAFT
from .batch import Decoder, exclude_mask, pred_slots
from .linear import LinearState, speculative_prefill
from .rows import QUADRATIC, Row, Step


class QuadraticDecoder(Decoder):
    speculative = True

    def scratch(self) -> int:
        k = self.cfg.block_len
        return k * (k + 1)

    def _prefill(self, rows: list[Row], cache: KVCache) -> tuple[list[Step], LinearState]:
        step, newest, drafts, q = speculative_prefill(self, rows, cache)
        return [step], LinearState(newest, drafts, torch.ones(len(rows), dtype=torch.bool, device=self.dev), q)

    def _cycle(self) -> list[Step]:
        s, sampler, c, dev = self.state, self.sampler(), self.c, self.dev
        B, k = len(self.running), self.cfg.block_len
        K = self.width(sampler)
        n_sub = K + 1  # slots per sub-block
        drafts = self.override(s.drafts[:, : K - 1])
        q = s.draft_q[:, : K - 1] if sampler.any_rejection and s.draft_q is not None else None
        tokens = torch.full((B, K, n_sub), c.mask_token_id, dtype=torch.long, device=dev)
        tokens[:, :, 0] = torch.cat([s.newest[:, None], drafts], dim=1)  # heads d_0 .. d_{K-1}
        tokens = tokens.view(B, K * n_sub)
        # Logits wanted: the K heads, then for each sub-block the K-1 drafts after its bonus
        # (mask slots 2..K of S_j predict positions j+2 .. j+K).
        j = torch.arange(K, device=dev)
        heads = j * n_sub
        sub = pred_slots(j[:, None] * n_sub + torch.arange(2, n_sub, device=dev)[None, :], c.dlm_type).reshape(-1)
        is_mask_slot = (torch.arange(K * n_sub, device=dev) % n_sub > 0)[None, :].expand(B, -1)
        h, gate = self.model(tokens, self.positions(masks.quadratic_positions(K, device=dev)), cache=self.cache,
                             mask=self.prefix_mask(masks.quadratic(K, device=dev)), adapter=self.adapter,
                             adapter_tokens=is_mask_slot, logits_at=torch.cat([heads, sub]).expand(B, -1),
                             hidden=True)
        # Uniforms of tokens starts .. starts + 2K - 2: verify slot j is token starts + j, the chosen
        # sub-block's draft i is token starts + n + i.
        u = sampler.uniforms(self.starts(), 2 * K - 1)
        res = sampler.verify(drafts, exclude_mask(self.model.head(h[:, :K]), c.mask_token_id), u[:, :K], q)
        n = res.accepted + 1  # heads d_0 .. d_{n-1} were right: n tokens out
        nxt_drafts, nxt_q = s.drafts[:, :0], None
        if K > 1:  # the head runs on the chosen sub-block's drafts only
            idx = K + res.accepted[:, None] * (K - 1) + torch.arange(K - 1, device=dev)[None, :]  # into logits_at
            hs = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
            gs = gate.gather(1, idx[..., None]) if gate is not None else None
            logits = exclude_mask(self.draft_head(hs, gs), c.mask_token_id)
            u_d = u[..., U_DRAFT].gather(1, n[:, None] + torch.arange(K - 1, device=dev)[None, :])
            nxt_drafts, nxt_q = sampler.choose(logits, u_d, want_probs=sampler.any_rejection)
        tokens, n = self.force(res.tokens, n)  # a thinking budget may cut the run at a forced token
        step = self.finish(QUADRATIC, tokens, n, accepted=n)
        self.cache.compact(heads.expand(B, K), self.only_active(n))  # only rows still decoding keep heads
        # Keep the drafts k - 1 wide (rows joining later carry k - 1): the padding is accepted only
        # if it happens to be right, and acceptance is checked anyway.
        pad = (k - 1) - (K - 1)
        self.state = LinearState(
            tokens.gather(1, (n - 1)[:, None]).squeeze(1),
            torch.cat([nxt_drafts, nxt_drafts.new_zeros(B, pad)], dim=1), s.has_draft,
            None if nxt_q is None else torch.cat([nxt_q, nxt_q.new_zeros(B, pad, nxt_q.shape[-1])], dim=1))
        return [step]
