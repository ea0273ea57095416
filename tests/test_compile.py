"""The compiled decode step (Transformer.compile_decode): static shapes (attention over every cache
slot, unwritten ones masked), one graph per batch and width; outputs equal the eager ones, token for
token, in every mode, batched and ragged."""

from __future__ import annotations

import pytest
import torch
from _tiny import PROMPTS, tiny_model

from trimode import generate

pytest.importorskip("torch._inductor")


@pytest.fixture(scope="module")
def pair():
    eager = tiny_model(adapter=True, dtype=torch.float32)
    compiled = tiny_model(adapter=True, dtype=torch.float32).compile_decode(max_tokens=32)
    return eager, compiled


@pytest.mark.parametrize("mode,block_len", [("ar", None), ("linear", 4), ("quadratic", 3), ("diffusion", 4)])
def test_compiled_equals_eager_in_every_mode(pair, mode, block_len):
    eager, compiled = pair
    kw = {"block_len": block_len} if block_len else {}
    a = generate(eager, PROMPTS, mode=mode, max_new_tokens=20, **kw)
    b = generate(compiled, PROMPTS, mode=mode, max_new_tokens=20, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.nfe for g in a] == [g.nfe for g in b]


def test_compiled_caches_come_in_a_few_capacities(pair):
    _, compiled = pair
    caps = {compiled.new_cache(1, n).capacity for n in (10, 100, 200, 256)}
    assert caps == {256}
    assert compiled.new_cache(1, 300).capacity == 512
