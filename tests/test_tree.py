"""Tree verification in linear mode: the tree pieces, and greedy output == AR with any tree."""

import pytest
import torch

from tests._tiny import PROMPTS, tiny_model
from trimode.decode import DecodeConfig, Row, generate, make_decoder
from trimode.decode import tree as tr


def test_grow_is_best_first_with_parents_first():
    # 3 slots, 2 candidates each: log-probs chosen so the best paths are known.
    lp = [[-0.1, -2.0], [-0.5, -0.7], [-0.2, -3.0]]
    ids = [[10, 11], [20, 21], [30, 31]]
    nodes = tr.grow(lp, ids, 5)
    assert nodes[0] == (10, 0, 1)  # best first token
    assert nodes[1] == (20, 1, 2) and nodes[2] == (21, 1, 2)  # both second tokens under it (-0.6, -0.8)
    assert nodes[3] == (30, 2, 3)  # then the deepest chain node (-0.8)
    assert len(nodes) == 5
    for j, (_, parent, depth) in enumerate(nodes):
        assert parent <= j  # parents come before children (the root is 0)
        assert depth == (1 if parent == 0 else nodes[parent - 1][2] + 1)
    assert [n[0] for n in tr.grow(lp, [[i[0]] for i in ids], 9)] == [10, 20, 30]  # branch 1: the chain


def test_ancestor_mask_and_walk():
    # root -> a(1) -> b(2); root -> c(3); a -> d(4)
    t = tr.Tree(tokens=torch.tensor([[5, 6, 7, 8]]), parent=torch.tensor([[0, 1, 0, 1]]),
                depth=torch.tensor([[1, 2, 1, 2]]))
    m = tr.ancestor_mask(t.parent)[0]
    want = {0: {0}, 1: {0, 1}, 2: {0, 1, 2}, 3: {0, 3}, 4: {0, 1, 4}}
    for i, seen in want.items():
        assert set(torch.nonzero(m[i]).flatten().tolist()) == seen
    # The verifier predicts 5 after the root, 8 after a: the walk is root -> a -> d, two accepted.
    paths, acc = tr.walk(t, torch.tensor([[5, 8, 0, 0, 0]]), D=2)
    assert paths == [[0, 1, 4]] and acc.tolist() == [2]
    paths, acc = tr.walk(t, torch.tensor([[9, 8, 0, 0, 0]]), D=2)
    assert paths == [[0]] and acc.tolist() == [0]


@pytest.mark.parametrize("dlm_type", ["llada", "dream"])
@pytest.mark.parametrize("K,nodes,branch", [(3, 4, 2), (4, 8, 3), (6, 12, 2), (8, 20, 4)])
def test_tree_linear_greedy_equals_ar(dlm_type, K, nodes, branch):
    m = tiny_model(dlm_type=dlm_type, adapter=True, eos=7)
    ref = generate(m, PROMPTS, mode="ar", max_new_tokens=40)
    got = generate(m, PROMPTS, mode="linear", block_len=K, max_new_tokens=40, tree_nodes=nodes, tree_branch=branch)
    assert [g.tokens for g in got] == [g.tokens for g in ref]
    for g in got:
        assert all(a >= 1 for a in g.stats["acceptance"])


def test_tree_rows_joining_mid_run_decode_as_alone():
    m = tiny_model(dlm_type="dream", adapter=True)
    ref = [g.tokens for g in generate(m, PROMPTS, mode="ar", max_new_tokens=24)]
    dec = make_decoder(m, "linear", DecodeConfig(max_new_tokens=24, block_len=5, tree_nodes=10))
    rows = [Row(p, max_new_tokens=24, index=i) for i, p in enumerate(PROMPTS)]
    dec.admit(rows[:2])
    dec.cycle()
    dec.admit(rows[2:3])
    dec.cycle()
    dec.cycle()
    dec.admit(rows[3:])
    while not dec.idle:
        dec.cycle()
    assert [r.tokens for r in rows] == ref


def test_tree_on_a_model_that_drafts_and_bad_settings():
    from trimode.checkpoint import load_model
    from trimode.models import BUNDLED

    m = load_model(BUNDLED, dtype=torch.float32)
    prompts = [[5, 60, 61, 62, 9, 300, 301], [70, 71, 72, 73], [400, 401, 402, 9, 403]]
    ref = generate(m, prompts, mode="ar", max_new_tokens=32)
    chain = generate(m, prompts, mode="linear", block_len=6, max_new_tokens=32)
    tree = generate(m, prompts, mode="linear", block_len=6, max_new_tokens=32, tree_nodes=16, tree_branch=3)
    assert [g.tokens for g in tree] == [g.tokens for g in ref] == [g.tokens for g in chain]
    assert max(a for g in tree for a in g.stats["acceptance"]) >= 2
    with pytest.raises(ValueError, match="tree_nodes"):
        DecodeConfig(max_new_tokens=4, tree_nodes=-1)
    with pytest.raises(ValueError, match="tree_branch"):
        DecodeConfig(max_new_tokens=4, tree_branch=0)


def test_merged_adapter_drafts_like_the_unmerged_one():
    m = tiny_model(dlm_type="dream", adapter=True)
    toks = torch.tensor([[1, 2, 3, 95, 95]])
    with torch.no_grad():
        plain = m(toks, adapter="draft")
        gated = m(toks, adapter="draft", adapter_tokens=torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.bool))
        m.merge_adapter("draft")
        merged = m(toks, adapter="draft")
        assert torch.equal(m(toks, adapter="draft", adapter_tokens=torch.tensor([[0, 0, 0, 1, 1]],
                                                                                 dtype=torch.bool)), gated)
    torch.testing.assert_close(merged, plain, rtol=1e-9, atol=1e-9)  # float64: the same function
    ref = generate(m, PROMPTS, mode="ar", max_new_tokens=20)
    assert [g.tokens for g in generate(m, PROMPTS, mode="linear", block_len=4, max_new_tokens=20)] == \
        [g.tokens for g in ref]
    with pytest.raises(ValueError, match="no adapter"):
        m.merge_adapter("nope")
    m.add_adapter("draft", targets=("o_proj",), r=2)  # replacing the adapter drops its merged copy
    assert all(not mod.merged for mod in m.modules() if hasattr(mod, "merged"))
