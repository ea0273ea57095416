"""A token n-gram datastore: continuations the model has written before, as one more draft path.

Retrieval drafting (REST, He et al., arXiv 2311.08252) drafts from a corpus instead of a model: find
the longest suffix of the context that occurs in the corpus and propose what followed it there. Here
the corpus is the model's own greedy continuations of training prompts (the self-distillation caches
the drafters are trained on), so its phrases are the model's own phrasing; the feature drafter's
tree verifies the retrieved path beside its own drafts, and every emitted token is still the
verifier's, so outputs do not change, only how many tokens a forward yields.

Index: for each order n (default 2..6) the 64-bit rolling hashes of every n-gram of the corpus that
has a next token in its sequence, sorted, with those next tokens alongside; a lookup is one binary
search per order. `continuation` chains lookups: the next token is the most frequent follower of the
longest matching suffix (backing off to shorter ones), appended, and looked up again.

On disk (`datastore.npz`, beside a feature drafter's weights): `tokens` (uint16 or int32, the
sequences concatenated), `starts` (int64, where each begins), `orders`, `min_share`, `version`,
`vocab_size`; the index is rebuilt at load (about a second per million tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VERSION = 1
FILE = "datastore.npz"
# the decoder's default: chain only while the follower has at least this share of the matches (on
# held-out chat prompts, SmolLM2: 0.3 gave more tokens per forward than 0 or 0.5, docs/speculation.md)
MIN_SHARE = 0.3
_MUL = np.uint64(0x9E3779B97F4A7C15)


def _hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Rolling hash of every window tokens[i : i + n] (len(tokens) - n + 1 of them), uint64."""
    t = tokens.astype(np.uint64) + np.uint64(1)
    h = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _MUL + t[k: len(t) - n + 1 + k]
    return h


class NgramStore:
    """The n-gram index of a token corpus (see the module docstring)."""

    def __init__(self, sequences: list[list[int]], *, orders: tuple[int, ...] = (2, 3, 4, 5, 6),
                 vocab_size: int | None = None, min_share: float = MIN_SHARE) -> None:
        orders = tuple(sorted(set(int(n) for n in orders)))
        if not orders or orders[0] < 1:
            raise ValueError(f"datastore orders must be integers >= 1, got {orders}")
        if not 0.0 <= float(min_share) <= 1.0:
            raise ValueError(f"a datastore's min_share must lie in [0, 1], got {min_share}")
        self.min_share = float(min_share)
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
        if not seqs:
            raise ValueError("a datastore needs at least one sequence of two or more tokens")
        starts = np.cumsum([0] + [len(s) for s in seqs[:-1]]).astype(np.int64)
        self._setup(np.concatenate(seqs), starts, orders, vocab_size)

    def _setup(self, flat: np.ndarray, starts: np.ndarray, orders: tuple[int, ...], vocab_size: int | None) -> None:
        flat = flat.astype(np.int64)
        if flat.min() < 0 or (vocab_size is not None and flat.max() >= vocab_size):
            raise ValueError(f"datastore token ids must lie in [0, {vocab_size}), got [{flat.min()}, {flat.max()}]")
        self.orders = orders
        self.vocab_size = vocab_size
        self.starts = starts
        self.tokens = flat.astype(np.int32 if flat.max() >= 1 << 16 else np.uint16)
        self._build()

    def _build(self) -> None:
        ends = np.append(self.starts[1:], len(self.tokens))
        seq_end = np.repeat(ends, np.diff(np.append(self.starts, len(self.tokens))))  # end of i's sequence
        self._index = {}
        for n in self.orders:
            if len(self.tokens) <= n:
                continue
            h = _hashes(self.tokens, n)[:-1]  # windows i .. i+n-1 with a next token at i + n
            i = np.arange(len(h))
            ok = i + n < seq_end[i]  # window and its next token inside one sequence
            h, nxt = h[ok], self.tokens[i[ok] + n]
            order = np.argsort(h)
            self._index[n] = (h[order], nxt[order])

    def __len__(self) -> int:
        return len(self.tokens)

    def next_token(self, context: list[int]) -> tuple[int, int, float] | None:
        """(token, order, share) for the longest suffix of context found: its most frequent follower
        (ties: the smallest id), the suffix length and the follower's share; None when no suffix of
        any order occurs."""
        for n in reversed(self.orders):
            if len(context) < n or n not in self._index:
                continue
            keys, nxt = self._index[n]
            h = _hashes(np.asarray(context[-n:], dtype=np.int64), n)[0]
            lo, hi = np.searchsorted(keys, h, "left"), np.searchsorted(keys, h, "right")
            if hi > lo:
                vals, counts = np.unique(nxt[lo:hi], return_counts=True)
                j = int(np.argmax(counts))
                return int(vals[j]), n, float(counts[j]) / float(hi - lo)
        return None

    def continuation(self, context: list[int], length: int, *, min_order: int = 2,
                     min_share: float = 0.0, min_path: float = 0.0) -> list[int]:
        """Up to `length` tokens chained from the store: each the most frequent follower of the longest
        matching suffix (order >= min_order, share >= min_share, and the product of the shares so far
        >= min_path), appended and looked up again."""
        ctx = list(context)
        out: list[int] = []
        path = 1.0
        while len(out) < length:
            r = self.next_token(ctx)
            if r is None or r[1] < min_order or r[2] < min_share or path * r[2] < min_path:
                break
            path *= r[2]
            out.append(r[0])
            ctx.append(r[0])
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        np.savez_compressed(path, tokens=self.tokens, starts=self.starts, orders=np.asarray(self.orders),
                            version=np.asarray(VERSION), min_share=np.asarray(self.min_share),
                            vocab_size=np.asarray(-1 if self.vocab_size is None else self.vocab_size))
        return path


def has_datastore(directory: str | Path) -> bool:
    return (Path(directory) / FILE).is_file()


def load_datastore(directory: str | Path, *, vocab_size: int | None = None) -> NgramStore:
    """The datastore saved in `directory`; a clear error when it is damaged, from another version, or
    holds ids outside the model's vocabulary."""
    path = Path(directory) / FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["version"])
            if version != VERSION:
                raise ValueError(f"{path}: datastore version {version}, this trimode reads version {VERSION}")
            tokens, starts, orders = z["tokens"], z["starts"], tuple(int(x) for x in z["orders"])
            saved_vocab = int(z["vocab_size"])
            min_share = float(z["min_share"])
    except (OSError, KeyError, ValueError, EOFError) as e:
        if isinstance(e, ValueError) and "datastore version" in str(e):
            raise
        raise ValueError(f"{path}: not a readable trimode datastore ({e})") from e
    if tokens.ndim != 1 or starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) \
            or starts[-1] >= len(tokens):
        raise ValueError(f"{path}: damaged datastore (its sequence starts do not fit its tokens)")
    if vocab_size is not None and saved_vocab not in (-1, vocab_size):
        raise ValueError(f"{path}: datastore built for a vocabulary of {saved_vocab}, the model has {vocab_size}")
    if not orders or min(orders) < 1 or not 0.0 <= min_share <= 1.0:
        raise ValueError(f"{path}: damaged datastore (orders {list(orders)}, min_share {min_share})")
    store = NgramStore.__new__(NgramStore)
    store.min_share = min_share
    store._setup(tokens, starts.astype(np.int64), tuple(sorted(set(orders))),
                 vocab_size if vocab_size is not None else (None if saved_vocab < 0 else saved_vocab))
    return store


def main(argv: list[str] | None = None) -> int:
    """`trimode build-datastore`: the datastore of self-distillation caches, written beside a feature drafter."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="trimode build-datastore", description=main.__doc__.split(":")[1].strip())
    p.add_argument("--data-cache", required=True, nargs="+",
                   help="self-distillation caches (.pt: tokens, lengths) of train-drafter --data-cache: the "
                        "model's own continuations of training prompts (never of prompts you evaluate on)")
    p.add_argument("--out", required=True,
                   help="a feature drafter directory (trimode train-feature-drafter --out): datastore.npz is "
                        "written there and loads with it")
    p.add_argument("--orders", default="2,3,4,5,6", help="n-gram orders indexed (comma-separated, default 2..6)")
    p.add_argument("--min-share", type=float, default=MIN_SHARE,
                   help=f"chain a retrieved token only while it follows at least this share of the matches "
                        f"(default {MIN_SHARE})")
    p.add_argument("--continuations-only", action="store_true",
                   help="index only the generated tokens, not the prompts (needs prompt_lengths in the caches)")
    args = p.parse_args(argv)
    try:
        orders = tuple(int(x) for x in args.orders.split(",") if x.strip())
    except ValueError:
        p.error(f"--orders must be comma-separated integers, got {args.orders!r}")
    try:
        store = build(args.data_cache, Path(args.out), orders=orders, min_share=args.min_share,
                      continuations_only=args.continuations_only)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / FILE}: {len(store.starts)} sequences, {len(store):,} tokens, "
          f"orders {list(store.orders)}, min share {store.min_share:g} "
          f"({(Path(args.out) / FILE).stat().st_size / 1e6:.1f} MB)")
    return 0


def build(caches: list[str], out: Path, *, orders: tuple[int, ...] = (2, 3, 4, 5, 6), min_share: float = MIN_SHARE,
          continuations_only: bool = False) -> NgramStore:
    """Read the caches (safely: tensors only), index their sequences and save the store into `out`,
    which must hold a feature drafter (the datastore is checked against its base's vocabulary)."""
    import torch

    from ._io import load_state, read_json
    from .feature_drafter import CONFIG_FILE

    if not (out / CONFIG_FILE).is_file():
        raise ValueError(f"{out} holds no feature drafter ({CONFIG_FILE}): the datastore is written beside one")
    info = read_json(out / CONFIG_FILE)
    vocab = info.get("base", {}).get("vocab_size") if isinstance(info, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int):
        raise ValueError(f"{out / CONFIG_FILE}: no base vocabulary size")
    seqs: list[list[int]] = []
    for path in caches:
        c = load_state(Path(path), "the self-distillation cache")
        if not isinstance(c, dict) or not {"tokens", "lengths"} <= set(c):
            raise ValueError(f"{path}: a self-distillation cache holds 'tokens' and 'lengths'")
        tk, ln = c["tokens"], c["lengths"]
        if not (isinstance(tk, torch.Tensor) and isinstance(ln, torch.Tensor)) or tk.dim() != 2 \
                or ln.shape != (tk.shape[0],):
            raise ValueError(f"{path}: 'tokens' must be (N, L) and 'lengths' (N,)")
        if continuations_only and not isinstance(c.get("prompt_lengths"), torch.Tensor):
            raise ValueError(f"{path}: --continuations-only needs 'prompt_lengths' in the cache")
        pl = c["prompt_lengths"] if continuations_only else torch.zeros_like(ln)
        for row, n, p0 in zip(tk.tolist(), ln.tolist(), pl.tolist()):
            if not 0 <= p0 <= n <= tk.shape[1]:
                raise ValueError(f"{path}: a length {n} (prompt {p0}) outside its row of {tk.shape[1]}")
            seqs.append(row[p0:n])
    store = NgramStore(seqs, orders=orders, vocab_size=vocab, min_share=min_share)
    store.save(out)
    return store
