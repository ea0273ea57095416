"""Tree verification for linear self-speculation (greedy rows).

The draft pass gives, for each of the D = K - 1 slots after the newest token, a distribution q_i over
the vocabulary (independent marginals: slot i does not see the tokens drafted before it). A chain
verifies only the top-1 of each slot; a tree verifies several continuations in the same causal
forward (SpecInfer, arXiv 2305.09781; Medusa, arXiv 2401.10774; EAGLE-2's best-first expansion,
arXiv 2406.16858). Here the tree has a fixed budget of N draft nodes, grown best-first: a node at
depth i is a token for slot i - 1, its score is the sum of log q over its path, and expanding a node
offers the `branch` most likely tokens of the next slot as children.

The verify forward runs [newest token (the root) ; N nodes] with each node at position
length + depth and attending to the cache, its ancestors and itself only (`ancestor_mask`), so the
logits at a node are the AR verifier's prediction after exactly the tokens on its path. Walking from
the root, a row moves to the child whose token equals the prediction at the current node; the
tokens emitted are the predictions along the walk (accepted drafts + the bonus), every one an AR
prediction given the emitted prefix, so greedy output equals AR greedy output whatever the tree
holds. The K/V of the walked nodes are moved to the front of the scratch and committed
(`KVCache.compact`). Padding nodes hold the mask id, which the verifier never predicts.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class Tree:
    """B trees of N draft nodes; node 0 of the verify input is the root (the newest token)."""

    tokens: torch.Tensor  # (B, N) draft token of each node
    parent: torch.Tensor  # (B, N) index of the parent among the T = N + 1 verify slots (0: the root)
    depth: torch.Tensor  # (B, N) 1 .. D (position offset from the root)


def grow(top_logp: list[list[list[float]]], top_ids: list[list[list[int]]], n: int) -> list[tuple[int, int, int]]:
    """Best-first tree of n nodes for one row. top_logp / top_ids: [slot][rank] (D slots, `branch`
    candidates each, best first). Returns nodes (token, parent slot index in the verify input,
    depth), parents before children."""
    D = len(top_ids)
    out: list[tuple[int, int, int]] = []
    if D == 0:
        return out
    heap = [(-top_logp[0][r], 0, r, 0) for r in range(len(top_ids[0]))]  # (-score, parent, rank, slot)
    heapq.heapify(heap)
    while heap and len(out) < n:
        neg, parent, rank, slot = heapq.heappop(heap)
        out.append((top_ids[slot][rank], parent, slot + 1))
        me = len(out)  # this node's index in the verify input (the root is 0)
        if slot + 1 < D:
            for r in range(len(top_ids[slot + 1])):
                heapq.heappush(heap, (neg - top_logp[slot + 1][r], me, r, slot + 1))
    return out


def build(logp: torch.Tensor | None, chains: torch.Tensor, use_logp: list[bool], n: int, branch: int,
          pad_id: int) -> Tree:
    """Trees for a batch. logp: (B, D, V) draft log-probabilities (rows with use_logp[b]); other rows
    get their chain (chains: (B, D) top-1 drafts, e.g. from the fused prefill draft) as a path.
    Every tree is padded to n nodes (padding: pad_id under the root, never predicted)."""
    B, D = chains.shape
    n = max(n, D)
    tops = None
    if logp is not None and any(use_logp) and D > 0:
        v, i = logp.topk(min(branch, logp.shape[-1]), dim=-1)
        tops = (v.tolist(), i.tolist())
    chain_list = chains.tolist()
    tok = [[pad_id] * n for _ in range(B)]
    par = [[0] * n for _ in range(B)]
    dep = [[1] * n for _ in range(B)]
    for b in range(B):
        if tops is not None and use_logp[b]:
            nodes = grow(tops[0][b], tops[1][b], n)
        else:
            nodes = [(chain_list[b][s], s, s + 1) for s in range(D)]  # a path: node s + 1 under node s
        for j, (t, p, d) in enumerate(nodes):
            tok[b][j], par[b][j], dep[b][j] = t, p, d
    dev = chains.device
    return Tree(torch.tensor(tok, device=dev), torch.tensor(par, device=dev), torch.tensor(dep, device=dev))


def ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """(B, T, T) with T = N + 1: slot i sees slot j iff j is i or an ancestor of i (the root is 0)."""
    B, N = parent.shape
    T = N + 1
    m = torch.zeros(B, T, T, dtype=torch.bool, device=parent.device)
    m[:, 0, 0] = True
    rows = torch.arange(B, device=parent.device)
    for i in range(1, T):  # parents come before children
        m[:, i] = m[rows, parent[:, i - 1]]
        m[:, i, i] = True
    return m


def walk(tree: Tree, pred: torch.Tensor, D: int) -> tuple[list[list[int]], torch.Tensor]:
    """Follow the verifier's predictions pred (B, T) (the AR token after each slot's path) from the
    root. Returns, per row, the walked slots (root first) and the accepted counts (B,)."""
    par, tok, p = tree.parent.tolist(), tree.tokens.tolist(), pred.tolist()
    paths = []
    for b in range(len(par)):
        children: dict[tuple[int, int], int] = {}
        for j, (pa, t) in enumerate(zip(par[b], tok[b])):
            children.setdefault((pa, t), j + 1)  # the first node with that token under that parent
        cur, path = 0, [0]
        while len(path) <= D:
            nxt = children.get((cur, p[b][cur]))
            if nxt is None:
                break
            path.append(nxt)
            cur = nxt
        paths.append(path)
    acc = torch.tensor([len(q) - 1 for q in paths], device=pred.device)
    return paths, acc
