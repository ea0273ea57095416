"""Attention masks as pure functions. `True` means "query may attend to key".

Inference masks are built in two parts: an *inner* (T, T) pattern among the T new tokens of a
forward, and `with_prefix`, which places that pattern after each row's committed cache prefix so
the result is a (B, T, S) mask over cache slots. The training mask (`dual_stream`) is one (2L, 2L)
matrix over the concatenated noisy and clean streams (docs/design-notes.md §3).
"""

from __future__ import annotations

import torch


def causal(T: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T): token t sees tokens 0..t."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def bidirectional(T: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T): every token sees every token (a diffusion canvas)."""
    return torch.ones(T, T, dtype=torch.bool, device=device)


def quadratic(k: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(k(k+1), k(k+1)) mask of the fused draft+verify forward (docs/design-notes.md §7).

    Sub-block j is [d_j, MASK x k]. Every query sees the heads d_0..d_j of sub-blocks up to its own;
    a mask query also sees all of its own sub-block (bidirectionally). A head therefore sees only
    heads before it and itself: it is processed causally, so its logits are the AR verifier's and
    its K/V are valid cache entries.
    """
    n = k + 1
    idx = torch.arange(k * n, device=device)
    sub, off = idx // n, idx % n  # sub-block and offset of each token
    q_sub, k_sub = sub[:, None], sub[None, :]
    q_off, k_off = off[:, None], off[None, :]
    sees_head = (k_off == 0) & (k_sub <= q_sub)
    own_block = (q_off > 0) & (k_sub == q_sub)
    return sees_head | own_block


def quadratic_positions(k: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(k(k+1),) position offsets of the quadratic layout: slot i of sub-block j sits at j + i."""
    n = k + 1
    idx = torch.arange(k * n, device=device)
    return idx // n + idx % n


def with_prefix(inner: torch.Tensor, lengths: torch.Tensor, S: int) -> torch.Tensor:
    """Place an inner pattern after each row's committed prefix.

    inner: (T, T) or (B, T, T) pattern among the new tokens; lengths: (B,) committed cache length
    per row (the new tokens occupy slots lengths[b] .. lengths[b]+T-1); S: number of key slots.
    Returns (B, T, S): slot s is visible to query t of row b iff s < lengths[b] (the committed,
    causal prefix is visible to every new token) or s is a new token that `inner` lets t see.
    """
    B = lengths.shape[0]
    T = inner.shape[-1]
    if inner.dim() == 2:
        inner = inner.unsqueeze(0).expand(B, T, T)
    slots = torch.arange(S, device=lengths.device)
    rel = slots[None, :] - lengths[:, None]  # (B, S): index of slot s among row b's new tokens
    in_new = (rel >= 0) & (rel < T)
    gathered = torch.gather(inner, 2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    return (rel < 0)[:, None, :] | (in_new[:, None, :] & gathered)


def segments(
    prompt_lengths: torch.Tensor, block_len: int, T: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """(B, T, T) mask for a fused "prompt + draft block" prefill (no cache before it).

    Row b holds its prompt (prompt_lengths[b] tokens, causal) followed by `block_len` mask tokens
    that see the whole prompt and each other; anything after them is padding that sees only itself
    and what precedes it causally.
    """
    pos = torch.arange(T, device=device)
    P = prompt_lengths.to(device)[:, None]
    q, k = pos[None, :, None], pos[None, None, :]
    in_block_q = (q >= P[:, :, None]) & (q < P[:, :, None] + block_len)
    in_block_k = (k >= P[:, :, None]) & (k < P[:, :, None] + block_len)
    causal_part = k <= q
    block_part = in_block_q & (in_block_k | (k < P[:, :, None]))
    return (causal_part & ~in_block_q) | block_part


def dual_stream(L: int, block_len: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(2L, 2L) training mask over [x_t ; x_0] (noisy stream first), docs/design-notes.md §3.

    - noisy query, noisy key: same block (bidirectional inside the block);
    - noisy query, clean key: the key's block is strictly before the query's block;
    - clean query, clean key: token-causal (key <= query);
    - clean query, noisy key: never.
    """
    idx = torch.arange(2 * L, device=device)
    noisy = idx < L
    tok = torch.where(noisy, idx, idx - L)
    blk = tok // block_len
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = blk[:, None], blk[None, :]
    qt, kt = tok[:, None], tok[None, :]
    m_bd = qn & kn & (qb == kb)
    m_obc = qn & ~kn & (kb < qb)
    m_fc = ~qn & ~kn & (kt <= qt)
    return m_bd | m_obc | m_fc
