"""The step-level decoder: a batch of rows that requests join and leave between cycles.

A `Decoder` owns one KV cache and per-row state tensors (first dimension = batch position) for the
rows in `running`. `admit(rows)` runs one prefill forward for the new rows on a cache of their own
and stacks it under the running batch; `cycle()` runs one decoding cycle (one forward for ar and
quadratic, draft + verify for linear, a whole block for diffusion). Finished and cancelled rows are
dropped after every admit and cycle, so their cache rows are freed and they cost no more compute.
This is the continuous-batching unit the server drives; `generate` is admit-all-then-cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cache import KVCache
from ..sampling import BatchSampler, resolve_rule
from .common import DecodeConfig, Row, Step, cache_capacity


def validate_rows(model: torch.nn.Module, rows: Sequence[Row], *, needs_mask: bool) -> None:
    """Raise ValueError for a request the model cannot serve (the server maps it to a 400)."""
    c = model.config
    if needs_mask and c.mask_token_id is None:
        raise ValueError("this mode needs a mask token, but the model config has mask_token_id=None")
    for r in rows:
        p = r.prompt
        if len(p) == 0:
            raise ValueError(f"prompt {r.index} is empty")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"prompt {r.index} has token ids outside [0, {c.vocab_size}): {bad[:5]}")
        if not isinstance(r.max_new_tokens, int) or isinstance(r.max_new_tokens, bool) or r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {r.max_new_tokens!r}")
        if len(p) + r.max_new_tokens > c.max_seq_len:
            raise ValueError(
                f"prompt {r.index} has {len(p)} tokens; with max_new_tokens={r.max_new_tokens} it exceeds "
                f"the context of {c.max_seq_len} tokens"
            )
        bad = [t for t in r.stop_ids if not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"stop token ids must lie in [0, {c.vocab_size}), got {sorted(bad)[:5]}")


class Decoder:
    """Base class: batch bookkeeping. Subclasses implement `_prefill` and `_cycle`.

    State tensors live in `self.state` (name -> tensor with one row per running row), so joining
    (`torch.cat`) and leaving (`index_select`) are generic.
    """

    mode: str = ""
    needs_mask: bool = True
    speculative: bool = False  # verifies drafts (linear, quadratic): rows get an acceptance rule

    def __init__(self, model: torch.nn.Module, cfg: DecodeConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.running: list[Row] = []
        self.cache: KVCache | None = None
        self.state: dict[str, torch.Tensor] = {}

    # -- subclass hooks -----------------------------------------------------------------------------
    def scratch(self) -> int:
        """Cache slots the widest forward of this mode writes past the committed tokens."""
        raise NotImplementedError

    def _prefill(self, rows: list[Row], cache: KVCache) -> tuple[list[Step], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _cycle(self) -> list[Step]:
        raise NotImplementedError

    def independent_draft(self) -> bool:
        """Whether this decoder's drafts are one-pass independent samples from recorded
        distributions (rejection sampling is valid); an external draft_override voids it."""
        return self.speculative and self.cfg.draft_override is None

    def sampler(self, rows: Sequence[Row]) -> BatchSampler:
        """The sampling side of a forward over `rows` (greedy rows take the argmax path)."""
        return BatchSampler([r.sampling for r in rows], [r.rng for r in rows],
                            independent_draft=self.independent_draft(), device=self.model.device)

    # -- public ------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.running

    def admit(self, rows: Sequence[Row]) -> list[Step]:
        """Prefill new rows (one forward) and add them to the running batch."""
        rows = [r for r in rows if not r.done]
        if not rows:
            return []
        validate_rows(self.model, rows, needs_mask=self.needs_mask)
        for r in rows:
            r.acceptance_rule = resolve_rule(r.sampling, independent_draft=self.independent_draft()) \
                if self.speculative else None
        cache = self.model.new_cache(len(rows), cache_capacity(rows, self.scratch()))
        steps, state = self._prefill(rows, cache)
        if self.running:
            self.cache = KVCache.cat([self.cache, cache])
            self.state = {k: torch.cat([v, state[k]]) for k, v in self.state.items()}
        else:
            self.cache, self.state = cache, state
        self.running = self.running + rows
        self._drop_finished()
        return steps

    def cycle(self) -> list[Step]:
        """One decoding cycle over the running rows (nothing when none is running)."""
        self._drop_finished()
        if not self.running:
            return []
        steps = self._cycle()
        self._drop_finished()
        return steps

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not r.done]
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.state = [], None, {}
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.cache.length.device)
        self.cache = self.cache.select(idx)
        self.state = {k: v.index_select(0, idx.to(v.device)) for k, v in self.state.items()}
        self.running = [self.running[i] for i in keep]
