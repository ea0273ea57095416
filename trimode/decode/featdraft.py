"""Linear speculation drafted by the feature drafter (trimode/feature_drafter.py, EAGLE-style).

A cycle: (1) the drafter takes the pairs (feature, emitted token) that the last verify forward
produced and commits them to its own one-layer cache; (2) it drafts K - 1 tokens one after another,
each step one drafter layer plus the output head over its vocabulary (scratch entries, rolled back
afterwards); (3) one causal verify forward of the model checks them (a chain, or for greedy batches
a tree: the drafted chain plus, at every depth, the drafter's next-best tokens as leaves, best-first
by the drafter's path probability, `tree_nodes` in all) and returns, besides its logits, the features
of every slot, so the next cycle's pairs come for free. Every emitted token is the verifier's
prediction given the emitted prefix, so greedy output equals AR greedy output; sampled rows draw each
draft from the drafter's processed distribution and verify with their rule (`trimode.sampling`):
`rejection` uses the recorded distribution of each draft, which depends only on the emitted prefix
and the drafts before it (standard speculative sampling with an autoregressive draft).

Forward accounting: the prefill and each verify are forwards of the model (`nfe`); the drafter's
steps are not (they run a single layer) and are counted in the row trace as DRAFT entries of their
own kind only when a benchmark asks for them (`stats["drafter_steps"]`); speed comparisons are in
tokens per second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import masks
from ..cache import KVCache
from ..sampling import U_DRAFT, top1
from . import tree as tr
from .batch import Decoder, State, exclude_mask
from .rows import PREFILL, VERIFY, Row, Step


@dataclass
class FeatState(State):
    newest: torch.Tensor  # (B,) newest emitted token, not yet cached
    pend_f: torch.Tensor  # (B, P, hidden) features of the pairs the drafter has not seen yet
    pend_t: torch.Tensor  # (B, P) the token emitted after each of those features
    pend_n: torch.Tensor  # (B,) how many of the P pairs are real

    def cat(self, other: State) -> State:
        P = max(self.pend_t.shape[1], other.pend_t.shape[1])

        def pad(s: FeatState) -> tuple[torch.Tensor, torch.Tensor]:
            extra = P - s.pend_t.shape[1]
            return F.pad(s.pend_f, (0, 0, 0, extra)), F.pad(s.pend_t, (0, extra))

        (fa, ta), (fb, tb) = pad(self), pad(other)
        return FeatState(torch.cat([self.newest, other.newest]), torch.cat([fa, fb]), torch.cat([ta, tb]),
                         torch.cat([self.pend_n, other.pend_n]))


def feature_drafter_of(model) -> object | None:
    return getattr(model, "feature_drafter", None)


class FeatureDraftDecoder(Decoder):
    speculative = True
    needs_mask = False  # drafts come from the feature drafter, not from mask tokens

    def __init__(self, model, cfg) -> None:
        super().__init__(model, cfg)
        self.fd = feature_drafter_of(model)
        if self.fd is None:
            raise ValueError("drafter 'feature' needs a model with a feature drafter "
                             "(load one with --feature-drafter DIR, or train one: trimode train-feature-drafter)")
        self.dcache: KVCache | None = None

    def scratch(self) -> int:
        return max(self.cfg.block_len, self.cfg.tree_nodes + 1)

    # -- the drafter's cache follows the batch ---------------------------------------------------
    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not r.done]
        if self.dcache is not None and len(keep) != len(self.running):
            self.dcache = self.dcache.select(keep) if keep else None
        super()._drop_finished()

    def _prefill(self, rows: list[Row], cache: KVCache) -> tuple[list[Step], FeatState]:
        from .batch import image_embeds

        c, dev = self.c, self.dev
        sampler = self.sampler(rows)
        lengths = torch.tensor([len(r.prompt) for r in rows], dtype=torch.long, device=dev)
        T = int(lengths.max())
        tokens = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            tokens[b, : len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long, device=dev)
        positions = torch.arange(T, device=dev).expand(len(rows), T)
        extra = {} if (embeds := image_embeds(self.model, rows, tokens)) is None else {"inputs_embeds": embeds}
        h, _ = self.model(tokens, positions, mask=masks.causal(T, device=dev), cache=cache, hidden=True, **extra)
        cache.commit(lengths)
        last = h.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, h.shape[-1]))
        logits = exclude_mask(self.model.head(last), c.mask_token_id)[:, 0]
        u = sampler.uniforms([len(r.tokens) for r in rows], 1)
        from ..sampling import U_SAMPLE

        first, _ = sampler.choose(logits, u[:, 0, U_SAMPLE])
        first = self.force(first[:, None], rows=rows)[0][:, 0]
        # Pairs of the prompt: (f_j, x_{j+1}) for j < len - 1, and (f_{len-1}, first token).
        pend_t = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        pend_t[torch.arange(len(rows), device=dev), lengths - 1] = first
        dc = self.fd.new_cache(len(rows), cache.capacity)
        self.dcache = dc if not self.running else KVCache.cat([self.dcache, dc])
        state = FeatState(first, h.to(self.fd.dtype), pend_t, lengths.clone())
        return [self.finish(PREFILL, first[:, None], rows=rows)], state

    # -- drafting -----------------------------------------------------------------------------
    def _feed(self) -> torch.Tensor:
        """Commit the pending pairs to the drafter's cache; the predicted feature of the slot after
        the newest token (B, 1, hidden)."""
        s, dc = self.state, self.dcache
        P = s.pend_t.shape[1]
        emb = self.model.embed_tokens(s.pend_t)
        pos = (dc.length[:, None] + 1 + torch.arange(P, device=self.dev)[None, :]).clamp(max=self.c.max_seq_len - 1)
        mask = masks.with_prefix(masks.causal(P, device=self.dev), dc.length, int(dc.length.max()) + P)
        h = self.fd(s.pend_f, emb, pos, mask=mask, cache=dc)
        n = s.pend_n.clamp(min=1)
        dc.commit(self.only_active(s.pend_n))
        return h.gather(1, (n - 1)[:, None, None].expand(-1, 1, h.shape[-1]))

    def _step(self, feat: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """One drafter step: entry (feat, token) after the drafter's cache; its predicted feature."""
        dc = self.dcache
        pos = (dc.length[:, None] + 1).clamp(max=self.c.max_seq_len - 1)
        mask = masks.with_prefix(masks.causal(1, device=self.dev), dc.length, int(dc.length.max()) + 1)
        out = self.fd(feat, self.model.embed_tokens(token[:, None]), pos, mask=mask, cache=dc)
        dc.commit(1)
        return out

    def _logits(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = self._extra_ids(self.fd.ids)
        z, ids = self.fd.logits(self.model, feat[:, 0], extra)
        if self.c.mask_token_id is not None:
            z = z.masked_fill(ids[None, :] == self.c.mask_token_id, float("-inf"))
        return z, ids

    # -- a cycle --------------------------------------------------------------------------------
    def _cycle(self) -> list[Step]:
        sampler = self.sampler()
        K = self.width(sampler)
        D = K - 1
        feat = self._feed()
        if D > 0 and not sampler.any and self.cfg.draft_override is None and self.cfg.tree_nodes > D:
            steps = self._tree_cycle(feat, D)
        else:
            steps = self._chain_cycle(feat, D, sampler)
        return steps

    def _chain_cycle(self, feat: torch.Tensor, D: int, sampler) -> list[Step]:
        s, dev, V = self.state, self.dev, self.c.vocab_size
        start = self.dcache.length.clone()
        B = len(self.running)
        drafts = torch.zeros(B, D, dtype=torch.long, device=dev)
        q = None
        if D > 0:
            u = sampler.uniforms(self.starts(), D)[..., U_DRAFT]
            qs = []
            for i in range(D):
                z, ids = self._logits(feat)
                full = z.new_full((B, V), float("-inf"))
                full.index_copy_(1, ids, z)
                tok, qi = sampler.choose(full, u[:, i], want_probs=sampler.any_rejection)
                drafts[:, i] = tok
                qs.append(qi)
                if i < D - 1:
                    feat = self._step(feat, tok)
            self.dcache.truncate(start)
            if sampler.any_rejection:
                q = torch.stack(qs, dim=1)
            drafts = self.override(drafts)
        K = D + 1
        canvas = torch.cat([s.newest[:, None], drafts], dim=1)
        h, _ = self.model(canvas, self.positions(torch.arange(K, device=dev)), cache=self.cache,
                          mask=self.prefix_mask(masks.causal(K, device=dev)), hidden=True)
        logits = exclude_mask(self.model.head(h), self.c.mask_token_id)
        res = sampler.verify(drafts, logits, sampler.uniforms(self.starts(), K), q)
        n = res.accepted + 1
        tokens, n = self.force(res.tokens, n)
        step = self.finish(VERIFY, tokens, n, accepted=n)
        n = self.only_active(n)
        self.cache.commit(n)
        self._carry(h, tokens, n)
        return [step]

    def _tree_cycle(self, feat: torch.Tensor, D: int) -> list[Step]:
        s, cfg, dev = self.state, self.cfg, self.dev
        B = len(self.running)
        start = self.dcache.length.clone()
        b = max(1, cfg.tree_branch)
        chain_logp, chain_tok = [], []  # per depth: (B, b) log-probabilities and ids, best first
        for i in range(D):
            z, ids = self._logits(feat)
            lp = torch.log_softmax(z.float(), dim=-1)
            v, j = lp.topk(min(b, lp.shape[-1]), dim=-1)
            chain_logp.append(v)
            chain_tok.append(ids[j])
            if i < D - 1:
                feat = self._step(feat, ids[j[:, 0]])
        self.dcache.truncate(start)
        t = self._build_tree(torch.stack(chain_logp, 1).tolist(), torch.stack(chain_tok, 1).tolist(), cfg.tree_nodes)
        tokens = torch.cat([s.newest[:, None], t.tokens], dim=1)
        offsets = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), t.depth], dim=1)
        h, _ = self.model(tokens, self.positions(offsets), cache=self.cache,
                          mask=self.prefix_mask(tr.ancestor_mask(t.parent)), hidden=True)
        pred = top1(exclude_mask(self.model.head(h), self.c.mask_token_id))
        paths, accepted = tr.walk(t, pred, D)
        width = max(len(p) for p in paths)
        keep = torch.tensor([p + [p[-1]] * (width - len(p)) for p in paths], device=dev)
        n = accepted + 1
        out, n = self.force(pred.gather(1, keep), n)
        step = self.finish(VERIFY, out, n, accepted=n)
        n = self.only_active(n)
        self.cache.compact(keep, n)
        self._carry(h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1])), out, n)
        return [step]

    def _build_tree(self, logp: list, toks: list, n: int) -> tr.Tree:
        """Per row: the drafted chain (rank 0 at every depth) and its siblings as leaves, the n best by
        path log-probability (a sibling's parent is the chain node above it), parents first."""
        B, D = len(toks), len(toks[0])
        pad = self.c.mask_token_id if self.c.mask_token_id is not None else 0
        n = max(n, D)
        T_tok, T_par, T_dep = [], [], []
        for r in range(B):
            cands = []  # (score, depth, rank)
            prefix = 0.0
            for d in range(D):
                for k in range(len(toks[r][d])):
                    cands.append((prefix + logp[r][d][k], d + 1, k))
                prefix += logp[r][d][0]
            cands.sort(key=lambda x: (-x[0], x[1], x[2]))
            chosen = sorted(cands[:n], key=lambda x: (x[1], x[2]))
            have_chain = {d for _, d, k in chosen if k == 0}
            chosen = [x for x in chosen if x[1] - 1 in have_chain or x[1] == 1]  # ancestors must be in
            index = {}  # depth -> verify slot of the chain node at that depth
            tok, par, dep = [], [], []
            for _, d, k in chosen:
                if d > 1 and (d - 1) not in index:
                    continue
                tok.append(toks[r][d - 1][k])
                par.append(0 if d == 1 else index[d - 1])
                dep.append(d)
                if k == 0:
                    index[d] = len(tok)
            while len(tok) < n:
                tok.append(pad)
                par.append(0)
                dep.append(1)
            T_tok.append(tok[:n])
            T_par.append(par[:n])
            T_dep.append(dep[:n])
        dev = self.dev
        return tr.Tree(torch.tensor(T_tok, device=dev), torch.tensor(T_par, device=dev),
                       torch.tensor(T_dep, device=dev))

    def _carry(self, h: torch.Tensor, tokens: torch.Tensor, n: torch.Tensor) -> None:
        """The next cycle's pending pairs: (feature of walked slot i, emitted token i) for i < n."""
        self.state = dataclasses.replace(
            self.state, newest=tokens.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1),
            pend_f=h.to(self.fd.dtype), pend_t=tokens, pend_n=n)
