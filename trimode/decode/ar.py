"""Autoregressive decoding: a causal prefill, then one token per causal forward.

Sampled rows draw token t from their processed distribution with the uniform of token t
(`trimode.sampling`); greedy rows take the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks
from ..cache import KVCache
from ..sampling import U_SAMPLE
from .batch import Decoder, State, exclude_mask, prefill
from .rows import AR_STEP, PREFILL, Row, Step


@dataclass
class ARState(State):
    newest: torch.Tensor  # (B,) newest emitted token, not yet cached


class ARDecoder(Decoder):
    needs_mask = False

    def scratch(self) -> int:
        return 1

    def _prefill(self, rows: list[Row], cache: KVCache) -> tuple[list[Step], ARState]:
        newest, _, _ = prefill(self, rows, cache, self.sampler(rows))
        newest = self.force(newest[:, None], rows=rows)[0][:, 0]
        return [self.finish(PREFILL, newest[:, None], rows=rows)], ARState(newest)

    def _cycle(self) -> list[Step]:
        sampler = self.sampler()
        offsets = torch.zeros(1, dtype=torch.long, device=self.dev)
        logits = self.model(self.state.newest[:, None], self.positions(offsets), cache=self.cache,
                            mask=self.prefix_mask(masks.causal(1, device=self.dev)))
        self.cache.commit(1)
        u = sampler.uniforms(self.starts(), 1)[:, 0, U_SAMPLE]
        newest, _ = sampler.choose(exclude_mask(logits[:, -1], self.c.mask_token_id), u)  # argmax if all greedy
        newest = self.force(newest[:, None])[0][:, 0]
        self.state = ARState(newest)
        return [self.finish(AR_STEP, newest[:, None])]
