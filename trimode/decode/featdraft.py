"""Linear speculation drafted by the feature drafter (trimode/feature_drafter.py, EAGLE-style).

A cycle: (1) the drafter takes the pairs (feature, emitted token) that the last verify forward
produced and commits them to its own one-layer cache; (2) it drafts K - 1 tokens one after another,
each step one drafter layer plus the output head over its vocabulary (scratch entries, rolled back
afterwards); (3) one causal verify forward of the model checks them (a chain, or for greedy batches
a tree grown by beam search over the drafter, `tree_nodes` in all, `_draft_tree`) and returns,
besides its logits, the features
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
import math
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

    def scratch(self) -> int:  # a tree may carry a prompt-lookup and a datastore path of block_len nodes each
        return max(self.cfg.block_len, self.cfg.tree_nodes + 2 * self.cfg.block_len + 1)

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
        h, f = self._verifier(tokens, positions, masks.causal(T, device=dev), cache, **extra)
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
        state = FeatState(first, f.to(self.fd.dtype), pend_t, lengths.clone())
        return [self.finish(PREFILL, first[:, None], rows=rows)], state

    def _verifier(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                  **extra) -> tuple[torch.Tensor, torch.Tensor]:
        """The verifier's forward: its final-normed states h (for the head) and the drafter's input
        features of the same slots (h itself, or h fused with the layers a multi-layer drafter taps)."""
        if not self.fd.taps:
            h, _ = self.model(tokens, positions, mask=mask, cache=cache, hidden=True, **extra)
            return h, h
        h, _, tapped = self.model.features(tokens, positions, mask=mask, cache=cache, taps=self.fd.taps, **extra)
        return h, self.fd.fuse_features(h, tapped)

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
        """Draft logits (..., n) of predicted features (..., hidden) and their token ids (n,)."""
        extra = self._extra_ids(self.fd.ids)
        z, ids = self.fd.logits(self.model, feat, extra)
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
                z, ids = self._logits(feat[:, 0])
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
        h, f = self._verifier(canvas, self.positions(torch.arange(K, device=dev)),
                              self.prefix_mask(masks.causal(K, device=dev)), self.cache)
        logits = exclude_mask(self.model.head(h), self.c.mask_token_id, inplace=True)
        res = sampler.verify(drafts, logits, sampler.uniforms(self.starts(), K), q)
        n = res.accepted + 1
        tokens, n = self.force(res.tokens, n)
        step = self.finish(VERIFY, tokens, n, accepted=n)
        n = self.only_active(n)
        self.cache.commit(n)
        self._carry(f, tokens, n)
        return [step]

    def _tree_cycle(self, feat: torch.Tensor, D: int) -> list[Step]:
        s, cfg, dev = self.state, self.cfg, self.dev
        B = len(self.running)
        t = self._draft_tree(feat, D, cfg.tree_nodes, max(1, cfg.tree_branch))
        tokens = torch.cat([s.newest[:, None], t.tokens], dim=1)
        offsets = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), t.depth], dim=1)
        h, f = self._verifier(tokens, self.positions(offsets), self.prefix_mask(tr.ancestor_mask(t.parent)),
                              self.cache)
        pred = top1(exclude_mask(self.model.head(h), self.c.mask_token_id, inplace=True))
        paths, accepted = tr.walk(t, pred, D)
        width = max(len(p) for p in paths)
        keep = torch.tensor([p + [p[-1]] * (width - len(p)) for p in paths], device=dev)
        n = accepted + 1
        out, n = self.force(pred.gather(1, keep), n)
        step = self.finish(VERIFY, out, n, accepted=n)
        n = self.only_active(n)
        self.cache.compact(keep, n)
        self._carry(f.gather(1, keep[..., None].expand(-1, -1, f.shape[-1])), out, n)
        return [step]

    def _draft_tree(self, feat: torch.Tensor, D: int, n_nodes: int, b: int) -> tr.Tree:
        """A draft tree grown by beam search over the drafter (EAGLE-2's expansion, arXiv 2406.16858):
        depth 1 holds the b likeliest tokens after the newest one; at each further depth the b best
        nodes of the depth above (by path log-probability) are drafted from in one drafter forward of
        b entries, each seeing the committed prefix, its ancestors' entries and itself, and give b
        children each. The n_nodes best nodes overall (a child never scores above its parent, so
        every chosen node's ancestors are chosen) form the verify tree, parents first."""
        dc, dev, B = self.dcache, self.dev, len(self.running)
        start = dc.length.clone()
        # nodes[r]: (score, depth, token, parent node or -1, entry slot or None); node i is verify slot i + 1
        nodes: list[list[list]] = [[] for _ in range(B)]
        z, ids = self._logits(feat[:, 0])
        v, j = torch.log_softmax(z.float(), dim=-1).topk(min(b, z.shape[-1]), dim=-1)
        v, tk = v.tolist(), ids[j].tolist()
        for r in range(B):
            for k in range(len(v[r])):
                nodes[r].append([v[r][k], 1, tk[r][k], -1, None])
        frontier = [list(range(len(nodes[r]))) for r in range(B)]
        parent_feat = feat.expand(B, b, feat.shape[-1])  # the feature each frontier node's entry reads
        n_keep = max(n_nodes, D)
        log_min = math.log(self.cfg.tree_min_prob) if self.cfg.tree_min_prob > 0 else -math.inf
        for d in range(1, D):
            if self._settled(nodes, frontier, n_keep):
                break  # no deeper node can enter the tree: stop drafting (same tree, fewer drafter steps)
            if self.cfg.tree_min_prob > 0 and all(
                    max(nodes[r][i][0] for i in f) < log_min for r, f in enumerate(frontier)):
                break  # no frontier path is likely enough to pay for another drafter step
            W = b
            fr = [f + [f[-1]] * (W - len(f)) for f in frontier]  # every row W entries (repeats are harmless)
            toks = torch.tensor([[nodes[r][i][2] for i in fr[r]] for r in range(B)], device=dev)
            base_len = dc.length.clone()
            S = int(base_len.max()) + W
            mask = (torch.arange(S, device=dev)[None, :] < start[:, None])[:, None, :].repeat(1, W, 1)
            ri, ki, si = [], [], []
            for r in range(B):
                for k, i in enumerate(fr[r]):
                    a = nodes[r][i][3]
                    while a >= 0:  # the ancestors' entries
                        ri.append(r), ki.append(k), si.append(nodes[r][a][4])
                        a = nodes[r][a][3]
                    ri.append(r), ki.append(k), si.append(int(base_len[r]) + k)  # and itself
            mask[ri, ki, si] = True
            pos = (start[:, None] + d).expand(B, W).clamp(max=self.c.max_seq_len - 1)
            out = self.fd(parent_feat, self.model.embed_tokens(toks), pos, mask=mask, cache=dc)  # (B, W, h)
            dc.commit(W)
            for r in range(B):
                for k, i in enumerate(fr[r][: len(frontier[r])]):
                    nodes[r][i][4] = int(base_len[r]) + k
            z, ids = self._logits(out)
            v, j = torch.log_softmax(z.float(), dim=-1).topk(min(b, z.shape[-1]), dim=-1)  # (B, W, b)
            v, tk = v.tolist(), ids[j].tolist()
            new_frontier, feats_idx = [], []
            for r in range(B):
                kids = []
                for k, i in enumerate(frontier[r]):
                    for c in range(len(v[r][k])):
                        nodes[r].append([nodes[r][i][0] + v[r][k][c], d + 1, tk[r][k][c], i, None])
                        kids.append((len(nodes[r]) - 1, k))
                kids.sort(key=lambda x: -nodes[r][x[0]][0])
                best = kids[:W]
                new_frontier.append([x[0] for x in best])
                feats_idx.append([x[1] for x in best] + [best[-1][1]] * (W - len(best)))
            frontier = new_frontier
            idx = torch.tensor(feats_idx, device=dev)
            parent_feat = out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))
        dc.truncate(start)
        pad = self.c.mask_token_id if self.c.mask_token_id is not None else 0
        n = n_keep
        T_tok, T_par, T_dep = [], [], []
        for r in range(B):
            order = sorted(range(len(nodes[r])), key=lambda i: (-nodes[r][i][0], nodes[r][i][1], i))[:n]
            order.sort(key=lambda i: (nodes[r][i][1], i))  # parents first
            slot = {}
            tok, par, dep = [], [], []
            for i in order:
                a = nodes[r][i][3]
                if a >= 0 and a not in slot:
                    continue
                slot[i] = len(tok) + 1
                tok.append(nodes[r][i][2])
                par.append(0 if a < 0 else slot[a])
                dep.append(nodes[r][i][1])
            if self.cfg.lookup:
                self._merge_lookup(r, D, tok, par, dep)
            if self.cfg.datastore and self.fd.datastore is not None:
                self._merge_datastore(r, D, tok, par, dep)
            T_tok.append(tok)
            T_par.append(par)
            T_dep.append(dep)
        n = max(n, *(len(t) for t in T_tok))
        for tok, par, dep in zip(T_tok, T_par, T_dep):
            tok += [pad] * (n - len(tok))
            par += [0] * (n - len(par))
            dep += [1] * (n - len(dep))
        return tr.Tree(torch.tensor(T_tok, device=dev), torch.tensor(T_par, device=dev),
                       torch.tensor(T_dep, device=dev))

    @staticmethod
    def _settled(nodes: list[list[list]], frontier: list[list[int]], n: int) -> bool:
        """True when, in every row, the best frontier node scores strictly below the n-th best node
        so far: a child scores at most its parent (log-probabilities add), so nothing drafted deeper
        could be among the n chosen (ties go to the shallower node), and drafting can stop early."""
        for r, f in enumerate(frontier):
            scores = sorted((x[0] for x in nodes[r]), reverse=True)
            if len(scores) < n or not f or max(nodes[r][i][0] for i in f) >= scores[n - 1]:
                return False
        return True

    def _merge_lookup(self, r: int, D: int, tok: list, par: list, dep: list) -> None:
        """Add the prompt-lookup continuation of row r (prompt lookup decoding, Saxena 2023: the tokens
        that followed the latest earlier occurrence of the context's last 3, else 2, tokens) to its tree
        as one more path from the root, sharing the nodes it already has; costs at most D verify slots."""
        row = self.running[r]
        ctx = row.prompt + row.tokens
        cont: list[int] = []
        for n in (3, 2):
            if len(ctx) <= n:
                continue
            tail = ctx[-n:]
            for i in range(len(ctx) - n - 1, -1, -1):
                if ctx[i: i + n] == tail:
                    cont = ctx[i + n: i + n + D]
                    break
            if cont:
                break
        self._merge_path(cont, tok, par, dep)

    def _merge_datastore(self, r: int, D: int, tok: list, par: list, dep: list) -> None:
        """Add the datastore's continuation of row r (trimode/datastore.py: what followed the longest
        matching suffix of its context in the model's earlier continuations, chained) as one more path
        from the root, sharing the nodes the tree already has; costs at most D verify slots."""
        row = self.running[r]
        ds = self.fd.datastore
        self._merge_path(ds.continuation(row.prompt + row.tokens, D, min_share=ds.min_share), tok, par, dep)

    @staticmethod
    def _merge_path(cont: list[int], tok: list, par: list, dep: list) -> None:
        """Walk `cont` down from the root of the tree (tok / par / dep, slot i + 1 = entry i), reusing a
        child with the same token where there is one and appending a node where there is not."""
        cur = 0
        for t in cont:
            child = next((j + 1 for j in range(len(tok)) if par[j] == cur and tok[j] == t), None)
            if child is None:
                tok.append(t)
                par.append(cur)
                dep.append(1 if cur == 0 else dep[cur - 1] + 1)
                child = len(tok)
            cur = child

    def _carry(self, h: torch.Tensor, tokens: torch.Tensor, n: torch.Tensor) -> None:
        """The next cycle's pending pairs: (feature of walked slot i, emitted token i) for i < n."""
        self.state = dataclasses.replace(
            self.state, newest=tokens.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1),
            pend_f=h.to(self.fd.dtype), pend_t=tokens, pend_n=n)
