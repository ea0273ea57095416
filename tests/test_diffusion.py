"""Diffusion mode: reduces to AR at block 1, never emits the mask id, hand-counted schedules on a stub."""

import math

import pytest
import torch
from _tiny import PROMPTS, tiny_model

from trimode import generate
from trimode.cache import KVCache
from trimode.config import ModelConfig

MASK = 95
CONF = [0.99, 0.95, 0.5, 0.3, 0.97, 0.6, 0.2, 0.91]  # confidence of a masked slot, by position % 8


def target(p: int) -> int:
    return 1 + (7 * p) % 50


class StubDenoiser(torch.nn.Module):
    """Logits that ignore context: a masked slot at position p proposes target(p) with probability
    CONF[p % 8]; any other token at position p predicts target(p + 1) (its AR continuation)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=96, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                                  num_kv_heads=1, head_dim=8, max_seq_len=512, mask_token_id=MASK)
        self.calls = 0

    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: torch.float32)

    def adapter_names(self):  # part of the decoders' model interface (trimode.decode.DecodableModel)
        return set()

    def new_cache(self, B, S):
        return KVCache(self.config, B, S)

    def forward(self, tokens, positions=None, *, mask=None, cache=None, adapter=None, adapter_tokens=None,
                logits_at=None):
        self.calls += 1
        if cache is not None:
            cache.begin(tokens.shape[1])
        if logits_at is not None:
            tokens, positions = tokens.gather(1, logits_at), positions.gather(1, logits_at)
        V = self.config.vocab_size
        out = torch.empty(*tokens.shape, V)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                p = int(positions[b, t])
                masked = int(tokens[b, t]) == MASK
                tgt, conf = (target(p), CONF[p % 8]) if masked else (target(p + 1), 0.999)
                probs = torch.full((V,), (1 - conf) / (V - 2))
                probs[tgt] = conf
                row = probs.log()
                row[MASK] = float("-inf")
                out[b, t] = row
        return out


PROMPT = [[3, 4, 5]]  # the first seed sits at position 3; blocks of 8 cover positions 3..10, 11..18
AR_TOKENS = [target(p) for p in range(3, 19)]


def test_stub_ar_continuation():
    g = generate(StubDenoiser(), PROMPT, mode="ar", max_new_tokens=16)[0]
    assert g.tokens == AR_TOKENS


# Masked slots of each block are at positions 4..10 (mod 8: 4,5,6,7,0,1,2), confidences
# 0.97, 0.6, 0.2, 0.91, 0.99, 0.95, 0.5. A step fills every slot >= tau plus the most confident.
# tau=0.9: 4 high slots in step 1, then the 3 low ones one per step -> 4 denoise steps per block.
# NFE = prefill 1 + block 1 (4 + commit 1) + block 2 (4, its commit skipped: nothing left) = 10.
# tau=0.5: 6 slots >= 0.5, then 0.2 -> 2 steps per block: 1 + (2 + 1) + 2 = 6.
# tau=1.0: one per step, 7 steps per block: 1 + (7 + 1) + 7 = 16 (= AR).
@pytest.mark.parametrize("tau, nfe", [(0.9, 10), (0.5, 6), (1.0, 16), (0.0, 4)])
def test_threshold_schedule_matches_hand_count(tau, nfe):
    stub = StubDenoiser()
    g = generate(stub, PROMPT, mode="diffusion", max_new_tokens=16, block_len=8, threshold=tau)[0]
    assert g.tokens == AR_TOKENS
    assert g.nfe == nfe == stub.calls
    assert sum(g.stats["step_tokens"]) == 16


def test_lower_threshold_never_costs_more_forwards():
    nfes = [generate(StubDenoiser(), PROMPT, mode="diffusion", max_new_tokens=16, block_len=8, threshold=t)[0].nfe
            for t in (1.0, 0.96, 0.92, 0.9, 0.7, 0.55, 0.4, 0.1, 0.0)]
    assert nfes == sorted(nfes, reverse=True)


def test_even_schedule_hand_count():
    # 7 masks over 3 steps: quotas 3, 2, 2 -> 3 denoise steps per block: 1 + (3 + 1) + 3 = 8.
    g = generate(StubDenoiser(), PROMPT, mode="diffusion", max_new_tokens=16, block_len=8, threshold=None, steps=3)[0]
    assert g.tokens == AR_TOKENS and g.nfe == 8
    g = generate(StubDenoiser(), PROMPT, mode="diffusion", max_new_tokens=16, block_len=8, threshold=None)[0]
    assert g.nfe == 1 + 7 + 1 + 7


def test_block_len_one_is_ar():
    m = tiny_model()
    ar = generate(m, PROMPTS, mode="ar", max_new_tokens=20)
    d = generate(m, PROMPTS, mode="diffusion", max_new_tokens=20, block_len=1)
    assert [g.tokens for g in d] == [g.tokens for g in ar]
    assert all(g.nfe == 20 and g.stats["forwards"] == {"prefill": 1, "commit": 19} for g in d)


@pytest.mark.parametrize("block_len", [4, 16])
def test_blocks_never_hold_the_mask_id(block_len):
    m = tiny_model()
    for tau in (0.9, 0.0, None):
        for g in generate(m, PROMPTS, mode="diffusion", max_new_tokens=37, block_len=block_len, threshold=tau):
            assert len(g.tokens) == 37 and MASK not in g.tokens
            assert sum(g.stats["step_tokens"]) == 37
            assert g.nfe >= 1 + math.ceil(36 / block_len)


def test_diffusion_stops_at_eos_inside_a_block():
    eos = AR_TOKENS[5]
    stub = StubDenoiser()
    object.__setattr__(stub, "config", stub.config.replace(eos_token_id=eos))
    g = generate(stub, PROMPT, mode="diffusion", max_new_tokens=16, block_len=8)[0]
    assert g.tokens == AR_TOKENS[:5] and g.finish_reason == "stop"


def test_batching_changes_no_token():
    m = tiny_model()
    for tau in (0.9, 0.0):
        batched = generate(m, PROMPTS, mode="diffusion", max_new_tokens=20, block_len=4, threshold=tau)
        for p, g in zip(PROMPTS, batched):
            alone = generate(m, [p], mode="diffusion", max_new_tokens=20, block_len=4, threshold=tau)[0]
            assert alone.tokens == g.tokens and alone.nfe == g.nfe
