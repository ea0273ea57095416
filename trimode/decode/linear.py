"""Linear self-speculation: a bidirectional draft pass, then a causal verify pass of the same weights.

Cycle (NLD's linear speculation, batched with ragged acceptance; see docs/design-notes.md): the
canvas is [newest, d_1 .. d_{K-1}] at positions length .. length+K-1, where `newest` is the newest
emitted token (not yet cached). The draft forward fills d_i from [newest, MASK x (K-1)] with the
draft adapter on; the verify forward runs the canvas causally with the adapter off, and its logits
after canvas[i] are the AR verifier's prediction for the slot of d_{i+1}. Row b accepts the longest
run of drafts the verifier agrees with, emits them and one more verifier token (the bonus, or the
recovered token at the first rejection), commits canvas[0 .. accepted] and carries the last emitted
token as the next `newest`. Every emitted token is a verifier choice given the emitted prefix, so
greedy output equals AR greedy output.

Improvement over the reference: the first draft is fused into the prefill forward (the prompt is
followed by K mask tokens that see it; the adapter acts on those tokens only), saving one forward.

Sampling (docs/sampling.md): a sampled row draws each d_i independently from its slot's processed
marginal q_i in the one draft forward and verifies with its rule (`trimode.sampling.accept`):
`match` samples the verifier at every slot, `rejection` runs the Leviathan/Chen test against the
recorded q_i, which is valid because q_i depends only on the emitted prefix. While a row verifies
by rejection, cycles draft a full block_len, so its drafts never depend on its neighbours' budgets.
Greedy batches may verify a tree of drafts instead of a chain (`tree.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks
from ..cache import KVCache
from ..sampling import U_DRAFT, top1
from . import tree as tr
from .batch import Decoder, State, exclude_mask, pred_slots, prefill
from .rows import DRAFT, PREFILL, VERIFY, Row, Step


@dataclass
class LinearState(State):
    newest: torch.Tensor  # (B,) newest emitted token, not yet cached
    drafts: torch.Tensor  # (B, k - 1) proposals for the tokens after it
    has_draft: torch.Tensor  # (B,) bool: drafts hold this cycle's proposals (from the fused prefill)
    draft_q: torch.Tensor | None = None  # (B, k - 1, V) their processed distributions (rejection rows)


def speculative_prefill(dec: Decoder, rows: list[Row], cache: KVCache) -> tuple[Step, torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]:
    """The prefill fused with the first draft (linear and quadratic): its Step, the first token (B,),
    the k - 1 drafts after it (B, k - 1; zeros with k = 1) and their distributions (or None)."""
    k = dec.cfg.block_len
    sampler = dec.sampler(rows)
    newest, drafts, q = prefill(dec, rows, cache, sampler, draft_len=k if k > 1 else 0)
    newest = dec.force(newest[:, None], rows=rows)[0][:, 0]  # (drafts after a forced token are verified anyway)
    if drafts is None:
        drafts = torch.zeros(len(rows), max(k - 1, 0), dtype=torch.long, device=dec.dev)
    return dec.finish(PREFILL, newest[:, None], rows=rows), newest, drafts, q


class LinearDecoder(Decoder):
    speculative = True

    def scratch(self) -> int:
        return max(self.cfg.block_len, self.cfg.tree_nodes + 1)

    def _prefill(self, rows: list[Row], cache: KVCache) -> tuple[list[Step], LinearState]:
        step, newest, drafts, q = speculative_prefill(self, rows, cache)
        has = torch.full((len(rows),), self.cfg.block_len > 1, device=self.dev)
        return [step], LinearState(newest, drafts, has, q)

    def draft_logits(self, newest: torch.Tensor, K: int) -> torch.Tensor:
        """Logits (mask id excluded) (B, K - 1, V) of the bidirectional draft forward after `newest`;
        reads the cache, commits nothing."""
        c = self.c
        canvas = torch.full((newest.shape[0], K), c.mask_token_id, dtype=torch.long, device=self.dev)
        canvas[:, 0] = newest
        want = pred_slots(torch.arange(1, K, device=self.dev), c.dlm_type).expand(newest.shape[0], K - 1)
        h, gate = self.model(canvas, self.positions(torch.arange(K, device=self.dev)), cache=self.cache,
                             mask=self.prefix_mask(masks.bidirectional(K, device=self.dev)), adapter=self.adapter,
                             logits_at=want, hidden=True)
        return exclude_mask(self.draft_head(h, gate), c.mask_token_id)

    def _cycle(self) -> list[Step]:
        s, sampler = self.state, self.sampler()
        K = self.width(sampler)
        if self.cfg.tree_nodes > K - 1 and K > 2 and not sampler.any and self.cfg.draft_override is None:
            return self._tree_cycle(K)
        steps: list[Step] = []
        drafts = s.drafts[:, : K - 1]  # (B, K-1)
        q = s.draft_q[:, : K - 1] if sampler.any_rejection and s.draft_q is not None else None
        need = ~s.has_draft  # rows that joined this cycle hold the drafts of their prefill
        if K > 1 and bool(need.any()):
            u = sampler.uniforms(self.starts(), K - 1)[..., U_DRAFT]
            fresh, fq = sampler.choose(self.draft_logits(s.newest, K), u, want_probs=sampler.any_rejection)
            drafts = torch.where(need[:, None], fresh, drafts)
            q = fq if q is None or fq is None else torch.where(need[:, None, None], fq.to(q.dtype), q)
            steps.append(self.finish(DRAFT, only=need))
        if K > 1:
            drafts = self.override(drafts)
        canvas = torch.cat([s.newest[:, None], drafts], dim=1)  # (B, K): [newest, d_1 .. d_{K-1}]
        logits = self.model(canvas, self.positions(torch.arange(K, device=self.dev)), cache=self.cache,
                            mask=self.prefix_mask(masks.causal(K, device=self.dev)))
        res = sampler.verify(drafts, exclude_mask(logits, self.c.mask_token_id),
                             sampler.uniforms(self.starts(), K), q)
        n = res.accepted + 1  # tokens emitted: the accepted drafts, then the bonus / recovered token
        tokens, n = self.force(res.tokens, n)  # a thinking budget may cut the run at a forced token
        steps.append(self.finish(VERIFY, tokens, n, accepted=n))
        self.cache.commit(self.only_active(n))  # a row that just finished may have accepted past its budget
        self.state = LinearState(tokens.gather(1, (n - 1)[:, None]).squeeze(1), s.drafts,
                                 torch.zeros_like(s.has_draft))
        return steps

    def _tree_cycle(self, K: int) -> list[Step]:
        """One greedy cycle verifying a best-first tree of cfg.tree_nodes draft nodes (tree.py)."""
        s, cfg, dev = self.state, self.cfg, self.dev
        B = len(self.running)
        steps: list[Step] = []
        need = ~s.has_draft  # rows that joined this cycle verify their prefill drafts as a chain
        logp = None
        if bool(need.any()):
            logp = torch.log_softmax(self.draft_logits(s.newest, K).float(), dim=-1)
            steps.append(self.finish(DRAFT, only=need))
        t = tr.build(logp, s.drafts[:, : K - 1], need.tolist(), cfg.tree_nodes, cfg.tree_branch,
                     pad_id=self.c.mask_token_id)
        tokens = torch.cat([s.newest[:, None], t.tokens], dim=1)
        offsets = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), t.depth], dim=1)
        logits = self.model(tokens, self.positions(offsets), cache=self.cache,
                            mask=self.prefix_mask(tr.ancestor_mask(t.parent)))
        pred = top1(exclude_mask(logits, self.c.mask_token_id))  # (B, T): AR token after each slot's path
        paths, accepted = tr.walk(t, pred, K - 1)
        width = max(len(p) for p in paths)
        keep = torch.tensor([p + [p[-1]] * (width - len(p)) for p in paths], device=dev)  # (B, width) slots
        n = accepted + 1
        tokens, n = self.force(pred.gather(1, keep), n)
        steps.append(self.finish(VERIFY, tokens, n, accepted=n))
        self.cache.compact(keep, self.only_active(n))
        self.state = LinearState(tokens.gather(1, (n - 1)[:, None]).squeeze(1), s.drafts,
                                 torch.zeros_like(s.has_draft))
        return steps

