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

Sampling (docs/sampling.md): a sampled row draws each d_i independently from its slot's processed
marginal q_i in the one draft forward, and verifies with its rule (`trimode.sampling.accept`):
`match` samples the verifier at every slot, `rejection` runs the Leviathan/Chen test against the
recorded q_i, which is valid because q_i depends only on the emitted prefix. While a row verifies
by rejection, cycles draft a full block_len, so its drafts never depend on its neighbours' budgets.
"""

from __future__ import annotations

import torch

from .. import masks
from ..sampling import U_DRAFT, BatchSampler
from .batch import Decoder
from .common import (
    DRAFT,
    PREFILL,
    VERIFY,
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
    return draft_logits(model, cache, nxt, K, adapter=adapter).argmax(-1)  # (B, K-1)


def draft_logits(
    model: torch.nn.Module, cache, nxt: torch.Tensor, K: int, *, adapter: str | None
) -> torch.Tensor:
    """Logits (mask id excluded) (B, K - 1, V) of the bidirectional draft forward after `nxt` (B,)."""
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
    return exclude_mask(logits, c.mask_token_id)


def sampled_draft(
    model: torch.nn.Module, cache, nxt: torch.Tensor, K: int, *, adapter: str | None, sampler: BatchSampler,
    starts: list[int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft forward for a batch with sampled rows: d_i drawn from its processed marginal with the
    draft uniform of its token (starts[b] + i - 1); returns drafts (B, K-1) and, when some row
    verifies by rejection, their distributions (B, K-1, V)."""
    logits = draft_logits(model, cache, nxt, K, adapter=adapter)
    u = sampler.uniforms(starts, K - 1)[..., U_DRAFT]
    return sampler.choose(logits, u, want_probs=sampler.any_rejection)


class LinearDecoder(Decoder):
    mode = "linear"
    speculative = True

    def scratch(self) -> int:
        return max(self.cfg.block_len, self.cfg.tree_nodes + 1)

    def _use_tree(self, sampler, K: int) -> bool:
        """Tree verification (`tree.py`) runs for all-greedy batches without a draft override."""
        return self.cfg.tree_nodes > K - 1 and K > 2 and not sampler.any and self.cfg.draft_override is None

    def _prefill(self, rows: list[Row], cache) -> tuple[list[Step], dict[str, torch.Tensor]]:
        c = self.model.config
        k = self.cfg.block_len
        record(rows, PREFILL)
        sampler = self.sampler(rows)
        nxt, drafts, q = prefill(self.model, rows, cache, draft_len=k if k > 1 else 0, mask_id=c.mask_token_id,
                                 adapter=adapter_for(self.model, self.cfg), sampler=sampler)
        keep_draft_q(rows, sampler, q)
        B = len(rows)
        has = drafts is not None
        if drafts is None:
            drafts = torch.zeros(B, max(k - 1, 0), dtype=torch.long, device=self.model.device)
        state = {"nxt": nxt, "drafts": drafts, "has_draft": torch.full((B,), has, device=self.model.device)}
        return [Step(PREFILL, [r.emit([int(nxt[i])]) for i, r in enumerate(rows)], rows)], state

    def _cycle(self) -> list[Step]:
        model, cache, cfg, rows = self.model, self.cache, self.cfg, list(self.running)
        c = model.config
        dev = model.device
        nxt, drafts, has_draft = self.state["nxt"], self.state["drafts"], self.state["has_draft"]
        B = len(rows)
        steps: list[Step] = []
        sampler = self.sampler(rows)
        starts = [len(r.tokens) for r in rows]  # token index of drafts[:, 0] and of the verifier's slot 0
        # Rows verifying by rejection always see a full block (their q must not depend on the batch).
        K = cfg.block_len if sampler.any_rejection else min(cfg.block_len, max(r.remaining() for r in rows))
        if self._use_tree(sampler, K):
            return self._tree_cycle(rows, K)
        q = None
        if K > 1:
            cur = drafts[:, : K - 1]
            q = stack_draft_q(rows, sampler, K - 1, c.vocab_size, dtype=probs_dtype(model), device=dev)
            need = ~has_draft  # rows that joined this cycle still hold the drafts of their prefill
            if bool(need.any()):
                drafted = record(rows, DRAFT, only=need.tolist())
                if sampler.any:
                    fresh, fq = sampled_draft(model, cache, nxt, K, adapter=adapter_for(model, cfg), sampler=sampler,
                                              starts=starts)
                    if q is not None:
                        q = torch.where(need[:, None, None], fq.to(q.dtype), q)
                else:
                    fresh = draft_pass(model, cache, nxt, K, adapter=adapter_for(model, cfg))
                cur = torch.where(need[:, None], fresh, cur)
                steps.append(Step(DRAFT, [[] if i in drafted else None for i in range(B)], rows))
            cur = apply_override(cfg, cur, rows)
            canvas = torch.cat([nxt[:, None], cur], dim=1)
        else:
            cur = drafts[:, :0]
            canvas = nxt[:, None]
        S = int(cache.length.max()) + K
        positions = clamp_positions(cache.length[:, None] + torch.arange(K, device=dev)[None, :], c.max_seq_len)
        logits = model(canvas, positions, mask=masks.with_prefix(masks.causal(K, device=dev), cache.length, S),
                       cache=cache)
        if sampler.any:
            res = sampler.verify(cur, exclude_mask(logits, c.mask_token_id), sampler.uniforms(starts, K), q)
            ar, n_acc = res.tokens, res.accepted  # ar[:, :n_acc + 1]: accepted drafts, recovered / bonus
            keep_draft_q(rows, sampler, None)
        else:
            ar = exclude_mask(logits, c.mask_token_id).argmax(-1)  # (B, K)
            n_acc = accept_greedy(cur, ar)  # (B,)
        verified = record(rows, VERIFY, accepted=(n_acc + 1).tolist())
        out: list[list[int] | None] = [None] * B
        for i in verified:
            out[i] = rows[i].emit(ar[i, : int(n_acc[i]) + 1].tolist())
        # Only rows still decoding commit: a row that just finished may have accepted past its budget
        # (it leaves the batch after this cycle anyway).
        cache.commit(torch.where(active_mask(rows, dev), n_acc + 1, torch.zeros_like(n_acc)))
        self.state["nxt"] = ar.gather(1, n_acc[:, None]).squeeze(1)
        self.state["has_draft"] = torch.zeros_like(has_draft)
        steps.append(Step(VERIFY, out, rows))
        return steps

    def _tree_cycle(self, rows: list[Row], K: int) -> list[Step]:
        """One greedy cycle with a verify tree of cfg.tree_nodes draft nodes (see tree.py)."""
        from . import tree as tr

        model, cache, cfg = self.model, self.cache, self.cfg
        c = model.config
        dev = model.device
        nxt, drafts, has_draft = self.state["nxt"], self.state["drafts"][:, : K - 1], self.state["has_draft"]
        B = len(rows)
        steps: list[Step] = []
        need = ~has_draft  # rows that joined this cycle verify their prefill drafts as a chain
        logp = None
        if bool(need.any()):
            drafted = record(rows, DRAFT, only=need.tolist())
            logits = draft_logits(model, cache, nxt, K, adapter=adapter_for(model, cfg))
            logp = torch.log_softmax(logits.float(), dim=-1)
            steps.append(Step(DRAFT, [[] if i in drafted else None for i in range(B)], rows))
        t = tr.build(logp, drafts, need.tolist(), cfg.tree_nodes, cfg.tree_branch, pad_id=c.mask_token_id)
        T = t.tokens.shape[1] + 1
        tokens = torch.cat([nxt[:, None], t.tokens], dim=1)
        offs = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), t.depth], dim=1)
        positions = clamp_positions(cache.length[:, None] + offs, c.max_seq_len)
        S = int(cache.length.max()) + T
        logits = model(tokens, positions, mask=masks.with_prefix(tr.ancestor_mask(t.parent), cache.length, S),
                       cache=cache)
        pred = exclude_mask(logits, c.mask_token_id).argmax(-1)  # (B, T): AR token after each slot's path
        paths, n_acc = tr.walk(t, pred, K - 1)
        verified = record(rows, VERIFY, accepted=(n_acc + 1).tolist())
        pl = pred.tolist()
        out: list[list[int] | None] = [None] * B
        for i in verified:
            out[i] = rows[i].emit([pl[i][j] for j in paths[i]])
        width = max(len(q) for q in paths)
        keep = torch.tensor([q + [q[-1]] * (width - len(q)) for q in paths], device=dev)
        cache.compact(keep, torch.where(active_mask(rows, dev), n_acc + 1, torch.zeros_like(n_acc)))
        self.state["nxt"] = pred.gather(1, keep[torch.arange(B, device=dev), n_acc][:, None]).squeeze(1)
        self.state["has_draft"] = torch.zeros_like(has_draft)
        steps.append(Step(VERIFY, out, rows))
        return steps
