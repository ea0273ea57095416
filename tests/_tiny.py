"""Tiny random models and stub drafters shared by the decoding tests."""

from __future__ import annotations

import torch

from trimode.config import ModelConfig
from trimode.model import Transformer, init_weights

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [20]]


def tiny_model(*, seed: int = 1, dlm_type: str = "llada", eos: int | None = None, adapter: bool = False,
               dtype: torch.dtype = torch.float64) -> Transformer:
    """A random 2-layer model; std 0.2 makes logits peaky enough that argmax ties never happen."""
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_seq_len=512, mask_token_id=95, eos_token_id=eos,
                      dlm_type=dlm_type)
    m = init_weights(Transformer(cfg), seed=seed, std=0.2)
    if adapter:
        m.add_adapter("draft", targets=("o_proj",), r=4, alpha=8.0)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".adapters.draft." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.to(dtype).eval()


class StubDrafter:
    """A stub drafter: proposes the reference continuation, corrupted where `wrong(i)` says so.

    drafts[b, i] is the proposal for generated token number len(rows[b].tokens) + i of the row in
    batch position b, whose reference is reference[rows[b].index] (see
    trimode.decode.DraftOverride). `never`: every proposal wrong; `always`: every one right.
    """

    def __init__(self, reference: list[list[int]], vocab: int, mask_id: int, wrong=lambda pos: False) -> None:
        self.reference = reference
        self.vocab = vocab
        self.mask_id = mask_id
        self.wrong = wrong

    def __call__(self, drafts: torch.Tensor, rows) -> torch.Tensor:
        out = drafts.clone()
        for b in range(drafts.shape[0]):
            start = len(rows[b].tokens)
            ref = self.reference[rows[b].index]
            for i in range(drafts.shape[1]):
                pos = start + i
                tok = ref[pos] if pos < len(ref) else 0
                if self.wrong(pos):
                    tok = (tok + 1) % self.vocab
                    if tok == self.mask_id:
                        tok = (tok + 1) % self.vocab
                out[b, i] = tok
        return out
