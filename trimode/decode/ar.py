"""Autoregressive decoding: a causal prefill, then one token per causal forward.

Sampled rows draw token t from their processed distribution with the uniform of token t
(`trimode.sampling`); greedy rows take the argmax.
"""

from __future__ import annotations

import torch

from .. import masks
from ..sampling import U_SAMPLE
from .batch import Decoder
from .common import AR_STEP, PREFILL, Row, Step, clamp_positions, exclude_mask, prefill, record


class ARDecoder(Decoder):
    mode = "ar"
    needs_mask = False

    def scratch(self) -> int:
        return 1

    def _prefill(self, rows: list[Row], cache) -> tuple[list[Step], dict[str, torch.Tensor]]:
        record(rows, PREFILL)
        nxt, _, _ = prefill(self.model, rows, cache, mask_id=self.model.config.mask_token_id,
                            sampler=self.sampler(rows))
        return [Step(PREFILL, [r.emit([int(nxt[i])]) for i, r in enumerate(rows)], rows)], {"nxt": nxt}

    def _cycle(self) -> list[Step]:
        model, cache, rows = self.model, self.cache, list(self.running)
        c = model.config
        nxt = self.state["nxt"]  # (B,) newest token per row, not yet in the cache
        S = int(cache.length.max()) + 1
        positions = clamp_positions(cache.length[:, None], c.max_seq_len)
        mask = masks.with_prefix(masks.causal(1, device=model.device), cache.length, S)
        logits = model(nxt[:, None], positions, mask=mask, cache=cache)
        cache.commit(1)
        stepped = record(rows, AR_STEP)
        sampler = self.sampler(rows)
        u = sampler.uniforms([len(r.tokens) for r in rows], 1)[:, 0, U_SAMPLE]
        nxt, _ = sampler.choose(exclude_mask(logits[:, -1], c.mask_token_id), u)  # argmax if all greedy
        self.state["nxt"] = nxt
        out: list[list[int] | None] = [None] * len(rows)
        for i in stepped:
            out[i] = rows[i].emit([int(nxt[i])])
        return [Step(AR_STEP, out, rows)]
