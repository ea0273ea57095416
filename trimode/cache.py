"""A static, batched KV cache with per-row committed lengths."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Static K/V buffers, one committed length per row.

    Invariant: slots [0, length) hold committed keys and values, always those of a *causal* pass,
    exactly what an AR model would hold. A forward writes its T new entries to scratch slots
    [length, length+T) and never moves `length`. Only decoders call `commit(n)` (keep the first n
    scratch entries), `compact(keep, n)` (keep chosen scratch slots, for the quadratic mode) or
    `truncate(n)`. The newest sampled token is not in the cache: it is the first input of the next
    forward.

    Slots are storage, not positions: the caller passes positions separately to the model.
    Buffers: k[layer], v[layer] of shape (B, H_kv, capacity, D).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}")
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity
        self.batch_size = batch_size
        self._pending = 0  # T of the last forward: how many scratch slots hold fresh entries

    # -- used by the model ----------------------------------------------------------------------
    def begin(self, T: int) -> int:
        """Check room for T scratch entries per row; return S, the number of key slots to read."""
        end = int(self.length.max()) + T
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: a forward of {T} tokens needs {end} slots, capacity is {self.capacity}"
            )
        self._pending = T
        return end

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new (B, H_kv, T, D) entries at each row's scratch slots; return keys/values [0, S)."""
        B, _, T, _ = k.shape
        slots = self.length[:, None] + torch.arange(T, device=k.device)[None, :]  # (B, T)
        rows = torch.arange(B, device=k.device)[:, None].expand(B, T)
        self.k[layer][rows, :, slots] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, slots] = v.transpose(1, 2).to(self.v[layer].dtype)
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    # -- used by decoders -----------------------------------------------------------------------
    def commit(self, n: torch.Tensor | int) -> None:
        """Keep the first n[b] scratch entries of row b (n may differ per row, or be 0)."""
        n = self._as_rows(n)
        if bool((n < 0).any()) or bool((n > self._pending).any()):
            raise ValueError(f"commit({n.tolist()}) outside the {self._pending} scratch entries written")
        self.length += n

    def compact(self, keep: torch.Tensor, n: torch.Tensor | int) -> None:
        """Move chosen scratch entries to the front of scratch, then commit them.

        keep: (B, K) indices into the last forward's T scratch entries, ascending per row; n: (B,)
        how many of them each row commits (the rest of `keep` is ignored).
        """
        n = self._as_rows(n)
        B, K = keep.shape
        if K == 0:
            return
        if bool((keep < 0).any()) or bool((keep >= self._pending).any()):
            raise ValueError("compact: indices outside the scratch entries of the last forward")
        # Only entries some row commits need to move, and a leading run already in place (keep[:, j]
        # == j for every row: the root and a chain-like accepted path) stays where it is.
        K = min(K, int(n.max()))
        ar = torch.arange(K, device=keep.device)
        still = torch.cumprod((keep[:, :K] == ar[None, :]).all(0).to(torch.long), 0)
        j0 = int(still.sum())
        if j0 >= K:
            self.commit(n)
            return
        src = self.length[:, None] + keep[:, j0:K]  # (B, K - j0) source slots
        dst = self.length[:, None] + ar[None, j0:]
        rows = torch.arange(B, device=keep.device)[:, None].expand(B, K - j0)
        for buf in (*self.k, *self.v):
            moved = buf[rows, :, src].clone()  # gather first: source and destination may overlap
            buf[rows, :, dst] = moved
        self.commit(n)

    def truncate(self, n: torch.Tensor | int) -> None:
        """Roll each row back to n[b] committed entries (n[b] <= current length)."""
        n = self._as_rows(n)
        if bool((n < 0).any()) or bool((n > self.length).any()):
            raise ValueError(f"truncate({n.tolist()}) beyond committed lengths {self.length.tolist()}")
        self.length = n.clone()

    # -- used by engines that change the batch between cycles ---------------------------------
    def select(self, rows: torch.Tensor | list[int]) -> KVCache:
        """A new cache holding only `rows` (indices, in that order): finished requests leave the batch."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.length.device)
        if idx.numel() == 0:
            raise ValueError("select: a cache needs at least one row")
        out = KVCache.__new__(KVCache)
        out.k = [buf.index_select(0, idx) for buf in self.k]
        out.v = [buf.index_select(0, idx) for buf in self.v]
        out.length = self.length.index_select(0, idx)
        out.capacity, out.batch_size, out._pending = self.capacity, int(idx.numel()), 0
        return out

    @staticmethod
    def cat(caches: list[KVCache]) -> KVCache:
        """Stack the rows of several caches (new requests join a running batch); the capacity is the
        largest of theirs, so every row keeps the room it was allocated with."""
        if not caches:
            raise ValueError("cat: no caches")
        if len(caches) == 1:
            return caches[0]
        cap = max(c.capacity for c in caches)
        first = caches[0]

        def widen(buf: torch.Tensor) -> torch.Tensor:
            if buf.shape[2] == cap:
                return buf
            pad = buf.new_zeros(buf.shape[0], buf.shape[1], cap - buf.shape[2], buf.shape[3])
            return torch.cat([buf, pad], dim=2)

        out = KVCache.__new__(KVCache)
        out.k = [torch.cat([widen(c.k[i]) for c in caches]) for i in range(len(first.k))]
        out.v = [torch.cat([widen(c.v[i]) for c in caches]) for i in range(len(first.v))]
        out.length = torch.cat([c.length for c in caches])
        out.capacity, out.batch_size, out._pending = cap, int(out.length.numel()), 0
        return out

    def _as_rows(self, n: torch.Tensor | int) -> torch.Tensor:
        if isinstance(n, int):
            return torch.full_like(self.length, n)
        n = n.to(self.length.device, torch.long)
        if n.shape != self.length.shape:
            raise ValueError(f"expected one count per row ({self.batch_size}), got shape {tuple(n.shape)}")
        return n
