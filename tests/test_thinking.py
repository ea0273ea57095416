"""The thinking budget: after `budget` tokens inside an open <think>, the next tokens are </think>
(here two ids, so the multi-token path is exercised), in every mode, batched with rows at different
budgets; the oracle is a plain uncached greedy loop that applies the rule token by token."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_model

from trimode import generate
from trimode.decode.thinking import ThinkState

N = 24
OPEN = (90,)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    prompts = [[5, 6, 7, 90], [11, 12, 90], [20, 21, 22, 23, 24, 90], [30, 90]]
    free = generate(model, prompts, mode="ar", max_new_tokens=N)
    seen = {t for g in free for t in g.tokens}
    close = tuple(t for t in range(60, 95) if t not in seen and t not in OPEN)[:2]  # never emitted unforced
    assert len(close) == 2
    return model, prompts, close


def oracle(model, prompt, budget, close, n):
    """Uncached greedy decoding, the budget applied token by token (inside from the prompt's <think>)."""
    seq, out, count, owed = list(prompt), [], 0, []
    inside = True
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
        if budget is not None:
            if owed:
                t = owed.pop(0)
            elif inside and count >= budget:
                t, owed = close[0], list(close[1:])
            elif inside:
                count += 1
            if t == close[-1] and not owed:
                inside = False
            elif t == OPEN[-1]:  # a new think span: its own budget
                inside, count = True, 0
        seq.append(t)
        out.append(t)
    return out


BUDGETS = [0, 3, 7, None]


@pytest.mark.parametrize("mode,block_len,tree", [("ar", None, 0), ("linear", 4, 0), ("quadratic", 3, 0),
                                                 ("diffusion", 4, 0), ("linear", 8, 0), ("linear", 4, 8)])
def test_close_lands_exactly_at_the_budget_in_every_mode(setup, mode, block_len, tree):
    model, prompts, close = setup
    kw = {"block_len": block_len} if block_len else {}
    if tree:
        kw["tree_nodes"] = tree  # linear verifying a tree of drafts (greedy batches)
    if mode == "diffusion":
        kw["threshold"] = None  # the even schedule: one slot per forward, every mode deterministic
    outs = generate(model, prompts, mode=mode, max_new_tokens=N, max_thinking_tokens=BUDGETS,
                    think_ids=(OPEN, close), **kw)
    for g, p, b in zip(outs, prompts, BUDGETS):
        if b is None:
            assert close[0] not in g.tokens
            continue
        assert g.tokens[b:b + 2] == list(close), (mode, b, g.tokens)
        assert close[0] not in g.tokens[:b]
        if mode != "diffusion":  # greedy speculation == greedy AR, budget included
            assert g.tokens == oracle(model, p, b, close, N), (mode, b)


def test_alone_equals_batched(setup):
    model, prompts, close = setup
    batched = generate(model, prompts, mode="linear", block_len=4, max_new_tokens=N, max_thinking_tokens=BUDGETS,
                       think_ids=(OPEN, close))
    for p, b, g in zip(prompts, BUDGETS, batched):
        alone = generate(model, [p], mode="linear", block_len=4, max_new_tokens=N, max_thinking_tokens=[b],
                         think_ids=(OPEN, close))[0]
        assert alone.tokens == g.tokens


def test_a_closed_prompt_or_an_own_close_is_not_forced(setup):
    model, _, close = setup
    # the prompt already closed its think span: nothing to force
    p = [5, 6, 90, 7, close[0], close[1]]
    g = generate(model, [p], mode="ar", max_new_tokens=N, max_thinking_tokens=0, think_ids=(OPEN, close))[0]
    upto = g.tokens.index(OPEN[0]) if OPEN[0] in g.tokens else len(g.tokens)
    assert close[0] not in g.tokens[:upto + 1]  # nothing forced until the model opens a span itself
    if upto < len(g.tokens) - 1:
        assert g.tokens[upto + 1] == close[0]  # ... which gets its own budget (0 here)
    # the plan keeps a model's own close and forces only what is owed
    st = ThinkState.for_prompt([1, 90], 2, OPEN, close)
    assert st.plan([4, 5, close[0], 9]) == [4, 5, close[0], close[1]]
    assert st.plan([4, 5, 6]) == [4, 5, close[0]]
    assert st.plan([4]) == [4]


@pytest.mark.parametrize("kw,match", [
    ({"max_thinking_tokens": -1}, "integer >= 0"),
    ({"max_thinking_tokens": 100}, "exceeds max_new_tokens"),
    ({"max_thinking_tokens": 2}, "think_ids"),
    ({"max_thinking_tokens": [1, 2]}, "one budget per prompt"),
    ({"max_thinking_tokens": 1.5}, "integer >= 0"),
])
def test_bad_budgets_are_value_errors(setup, kw, match):
    model, prompts, close = setup
    if "think_ids" not in match:
        kw = {**kw, "think_ids": (OPEN, close)}
    with pytest.raises(ValueError, match=match):
        generate(model, prompts[:1], mode="ar", max_new_tokens=N, **kw)


def test_the_server_applies_a_thinking_budget_in_every_mode():
    """Through HTTP on the bundled model: /v1/completions with max_thinking_tokens puts the </think>
    pieces right after the budget's tokens, in every mode, streamed or not; bad budgets are 400s."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from trimode.checkpoint import load_model
    from trimode.models import resolve_model
    from trimode.serve.app import ServerSettings, create_app
    from trimode.serve.engine import Engine, EngineConfig
    from trimode.tokenizer import load_tokenizer

    path = resolve_model("bundled")
    model, tok = load_model(path), load_tokenizer(path)
    close = tok.think_ids()[1]
    prompt = "Q: why?\n<think>"
    eng = Engine(model, tok, EngineConfig())
    app = create_app(eng, tok, ServerSettings(model_name="bundled", context=model.config.max_seq_len,
                                              vocab_size=model.config.vocab_size, default_block_len=4))
    with TestClient(app) as c:
        free = generate(model, [tok.encode(prompt)], mode="ar", max_new_tokens=3, eos_id=tok.eos_id)[0].tokens
        want = tok.decode(free + close)
        for mode in ("ar", "linear", "quadratic", "diffusion"):
            body = {"prompt": prompt, "max_tokens": 16, "max_thinking_tokens": 3,
                    "decoding": {"mode": mode, "block_len": 3}}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert "</think>" in text, (mode, text)
            if mode != "diffusion":
                assert text.startswith(want), (mode, text, want)
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "max_thinking_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_thinking_tokens"
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "max_thinking_tokens": -1})
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "reasoning_effort": "extreme"})
        assert r.status_code == 400
