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

Sampling (docs/sampling.md): the heads' logits are the verifier's p; every sub-block's mask slots
are sampled independently from their processed marginals (token t's draft uniform, shared by every
sub-block that covers t). The sub-block of the last accepted head is kept with its distributions;
they depend only on d_0..d_j, all emitted once it is chosen, so `rejection` is valid here too.
While a row verifies by rejection, cycles use a full block_len.
"""

from __future__ import annotations

import torch

from .. import masks
from ..sampling import U_DRAFT
from .batch import Decoder
from .common import (
    PREFILL,
    QUADRATIC,
    Row,
    Step,
    active_mask,
    adapter_for,
    apply_override,
    clamp_positions,
    exclude_mask,
    keep_draft_q,
    pred_slots,
    prefill,
    probs_dtype,
    record,
    stack_draft_q,
)
from .linear import accept_greedy


class QuadraticDecoder(Decoder):
    mode = "quadratic"
    speculative = True

    def scratch(self) -> int:
        k = self.cfg.block_len
        return k * (k + 1)

    def _prefill(self, rows: list[Row], cache) -> tuple[list[Step], dict[str, torch.Tensor]]:
        c = self.model.config
        k = self.cfg.block_len
        record(rows, PREFILL)
        sampler = self.sampler(rows)
        nxt, drafts, q = prefill(self.model, rows, cache, draft_len=k if k > 1 else 0, mask_id=c.mask_token_id,
                                 adapter=adapter_for(self.model, self.cfg), sampler=sampler)
        keep_draft_q(rows, sampler, q)
        if drafts is None:
            drafts = torch.zeros(len(rows), 0, dtype=torch.long, device=self.model.device)
        steps = [Step(PREFILL, [r.emit([int(nxt[i])]) for i, r in enumerate(rows)], rows)]
        return steps, {"nxt": nxt, "drafts": drafts}

    def _cycle(self) -> list[Step]:
        model, cache, cfg, rows = self.model, self.cache, self.cfg, list(self.running)
        c = model.config
        dev = model.device
        B = len(rows)
        k = cfg.block_len
        sampler = self.sampler(rows)
        starts = [len(r.tokens) for r in rows]  # token index of d_1 and of ar[:, 0]
        # Rows verifying by rejection always see a full block (their q must not depend on the batch).
        K = k if sampler.any_rejection else min(k, max(r.remaining() for r in rows))
        n = K + 1
        drafts = apply_override(cfg, self.state["drafts"][:, : K - 1], rows)
        q = stack_draft_q(rows, sampler, K - 1, c.vocab_size, dtype=probs_dtype(model), device=dev)
        heads = torch.cat([self.state["nxt"][:, None], drafts], dim=1)  # (B, K): d_0 .. d_{K-1}
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
        adapter = adapter_for(model, cfg)
        # One forward, but the output head runs only where logits are read: the K heads first; then,
        # once verification has chosen sub-block n_ok - 1 per row, its K - 1 drafts (2K - 1 head rows
        # instead of K + K(K - 1)).
        h, gate = model(tokens, positions, mask=masks.with_prefix(masks.quadratic(K, device=dev), cache.length, S),
                        cache=cache, adapter=adapter, adapter_tokens=is_mask_slot, logits_at=want, hidden=True)
        head_logits = exclude_mask(model.head(h[:, :K]), c.mask_token_id)  # heads: base weights, no gate

        def chosen_drafts(last: torch.Tensor) -> torch.Tensor:
            """Logits (B, K-1, V) of the drafts of sub-block last[b] (B,)."""
            idx = K + last[:, None] * (K - 1) + torch.arange(K - 1, device=dev)[None, :]  # (B, K-1) into want
            hs = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
            gs = gate.gather(1, idx[..., None]) if gate is not None else None
            return exclude_mask(model.head(hs, adapter=adapter, gate=gs), c.mask_token_id)

        sub_q = None
        if sampler.any:
            # Uniforms of tokens starts .. starts + 2K - 2: verify slots j (token starts + j) and
            # sub-block j's draft i (token starts + j + 1 + i).
            u = sampler.uniforms(starts, 2 * K - 1)
            res = sampler.verify(drafts, head_logits, u[:, :K], q)
            ar = res.tokens  # ar[:, :n_ok]: accepted drafts, then the recovered / bonus token
            n_ok = res.accepted + 1
            if K > 1:
                tok_idx = n_ok[:, None] + torch.arange(K - 1, device=dev)[None, :]  # (B, K-1): tokens j+1+i
                u_d = u[..., U_DRAFT].gather(1, tok_idx)
                nxt_drafts, sub_q = sampler.choose(chosen_drafts(n_ok - 1), u_d, want_probs=sampler.any_rejection)
            else:
                nxt_drafts = drafts.new_zeros(B, 0)
        else:
            ar = head_logits.argmax(-1)  # (B, K): ar[:, j] is the AR prediction after d_j
            n_ok = accept_greedy(drafts, ar) + 1  # heads d_0 .. d_{n_ok-1} are correct
            nxt_drafts = chosen_drafts(n_ok - 1).argmax(-1) if K > 1 else drafts.new_zeros(B, 0)
        stepped = record(rows, QUADRATIC, accepted=n_ok.tolist())
        out: list[list[int] | None] = [None] * B
        for i in stepped:
            out[i] = rows[i].emit(ar[i, : int(n_ok[i])].tolist())
        # Only rows still decoding keep their heads (see linear.py).
        cache.compact(head_slots.expand(B, K), torch.where(active_mask(rows, dev), n_ok, torch.zeros_like(n_ok)))
        last = (n_ok - 1)[:, None]
        self.state["nxt"] = ar.gather(1, last).squeeze(1)
        keep_draft_q(rows, sampler, sub_q)
        # Keep the state k - 1 wide (rows joining later carry k - 1 drafts); the padding is never
        # accepted unless it happens to be right, and acceptance is checked anyway.
        self.state["drafts"] = torch.cat([nxt_drafts, nxt_drafts.new_zeros(B, (k - 1) - (K - 1))], dim=1)
        return [Step(QUADRATIC, out, rows)]
