"""The feature drafter (EAGLE-style) in linear mode: greedy == AR, sampling lossless, files, bad input.

The drafter is trained here for a few hundred steps on the tiny model's own greedy continuations, so
its drafts are often right and the verify paths that accept drafts (chain and tree) are exercised.
The test prompts' own continuations are in its training data: these tests check the decoding, not
how well a drafter generalises."""

from __future__ import annotations

import json
import random

import pytest
import torch
from _tiny import PROMPTS, tiny_model

from trimode import generate
from trimode.bench.chi2 import chi2_sf, chi2_two_sample
from trimode.decode import DecodeConfig, Row, make_decoder
from trimode.feature_drafter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FeatureDrafter,
    init_from_base,
    load_feature_drafter,
)
from trimode.train.feature_drafter import _Unrolled, compute_features, pair_loss, unroll_mask

PROMPT = [5, 17, 33, 2]


def _continuations(model, prompts: list[list[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts + their AR continuations of n tokens, right-padded (N, L), and their lengths."""
    outs = generate(model, prompts, mode="ar", max_new_tokens=n)
    seqs = [p + o.tokens for p, o in zip(prompts, outs)]
    tokens = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens, torch.tensor([len(s) for s in seqs])


def _train(model, steps: int = 250) -> FeatureDrafter:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 90, (int(n),), generator=g).tolist() for n in torch.randint(2, 8, (40,), generator=g)]
    prompts += PROMPTS * 2 + [PROMPT] * 2  # the prompts decoded below: the drafter has seen their continuations
    tokens, lengths = _continuations(model, prompts, 40)
    feats = compute_features(model, tokens, lengths, batch=16, log=lambda s: None).to(model.dtype)
    fd = init_from_base(FeatureDrafter(model.config, torch.arange(95)), model).to(model.dtype)
    opt = torch.optim.AdamW(fd.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(steps):
        b = rng.sample(range(len(lengths)), 16)
        loss, _ = pair_loss(fd, model, feats[b], tokens[b], lengths[b], noise=0.05, reg_weight=1.0, ce_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return fd.eval()


@pytest.fixture(scope="module")
def model():
    m = tiny_model(dlm_type="dream", eos=7, dtype=torch.float32)
    torch.manual_seed(0)
    m.set_feature_drafter(_train(m))
    return m


@pytest.mark.parametrize("K,nodes", [(1, 0), (2, 0), (4, 0), (6, 0), (3, 6), (5, 10), (8, 16)])
def test_greedy_equals_ar_and_drafts_are_accepted(model, K, nodes):
    ref = generate(model, PROMPTS, mode="ar", max_new_tokens=40)
    got = generate(model, PROMPTS, mode="linear", block_len=K, max_new_tokens=40, tree_nodes=nodes)
    assert [g.tokens for g in got] == [g.tokens for g in ref]
    acc = [a for g in got for a in g.stats["acceptance"]]
    assert all(1 <= a <= K for a in acc)
    if K >= 4:  # a trained drafter: most cycles accept drafts, and a forward yields > 1.5 tokens
        assert sum(acc) / len(acc) > 1.5, acc
    for g in got:
        assert sum(g.stats["step_tokens"]) == len(g.tokens)


def test_tree_accepts_at_least_as_much_as_the_chain(model):
    chain = generate(model, PROMPTS, mode="linear", block_len=6, max_new_tokens=40, tree_nodes=0)
    tree = generate(model, PROMPTS, mode="linear", block_len=6, max_new_tokens=40, tree_nodes=12)
    assert sum(g.nfe for g in tree) <= sum(g.nfe for g in chain)


def test_adapter_drafter_is_still_there(model):
    ref = generate(model, PROMPTS, mode="ar", max_new_tokens=20)
    got = generate(model, PROMPTS, mode="linear", block_len=4, max_new_tokens=20, drafter="adapter")
    assert [g.tokens for g in got] == [g.tokens for g in ref]
    assert all(g.stats["forwards"].get("draft", 0) > 0 for g in got)  # the draft pass of the model ran
    feat = generate(model, PROMPTS, mode="linear", block_len=4, max_new_tokens=20)  # auto: the feature drafter
    assert all("draft" not in g.stats["forwards"] for g in feat)
    with pytest.raises(ValueError, match="drafter must be one of"):
        generate(model, PROMPTS, mode="linear", block_len=4, max_new_tokens=4, drafter="eagle")


def test_feature_drafter_needs_one():
    m = tiny_model(dlm_type="dream", dtype=torch.float32)
    with pytest.raises(ValueError, match="needs a model with a feature drafter"):
        generate(m, PROMPTS, mode="linear", block_len=4, max_new_tokens=4, drafter="feature")
    # auto without one: the adapter / base draft pass, as before
    assert len(generate(m, PROMPTS, mode="linear", block_len=4, max_new_tokens=4)[0].tokens) == 4


def test_rows_joining_mid_run_decode_as_alone(model):
    ref = [g.tokens for g in generate(model, PROMPTS, mode="ar", max_new_tokens=24)]
    for nodes in (0, 10):
        dec = make_decoder(model, "linear", DecodeConfig(max_new_tokens=24, block_len=5, tree_nodes=nodes))
        rows = [Row(p, max_new_tokens=24, index=i) for i, p in enumerate(PROMPTS)]
        dec.admit(rows[:2])
        dec.cycle()
        dec.admit(rows[2:3])
        dec.cycle()
        dec.admit(rows[3:])
        with torch.inference_mode():
            while not dec.idle:
                dec.cycle()
        assert [r.tokens for r in rows] == ref


# -- sampling -------------------------------------------------------------------------------------
N = 2000
KW = {"temperature": 0.9, "top_k": 4}


def _pvalue(a, b) -> float:
    def code(gens):
        t = torch.tensor([(g.tokens + [95] * 3)[:3] for g in gens])  # a row that stopped early: 95 pads it
        return t[:, 0] * 96 * 96 + t[:, 1] * 96 + t[:, 2]

    a, b = code(a), code(b)
    cats = torch.unique(torch.cat([a, b]))

    def counts(x):
        return (x[:, None] == cats[None, :]).sum(0)

    return chi2_sf(*chi2_two_sample(counts(a), counts(b)))


@pytest.mark.parametrize("rule", ["match", "rejection"])
def test_sampling_matches_ar_in_distribution(model, rule):
    ar = generate(model, [PROMPT] * N, mode="ar", max_new_tokens=3, seed=0, **KW)
    sp = generate(model, [PROMPT] * N, mode="linear", block_len=4, max_new_tokens=3, seed=N, acceptance=rule, **KW)
    assert all(g.stats["acceptance_rule"] == rule for g in sp)
    assert _pvalue(ar, sp) >= 1e-3


def test_match_reproduces_ar_for_the_same_seed_and_batches_do_not_matter(model):
    ar = generate(model, PROMPTS, mode="ar", max_new_tokens=20, seed=7, temperature=1.0)
    sp = generate(model, PROMPTS, mode="linear", block_len=4, max_new_tokens=20, seed=7, temperature=1.0,
                  acceptance="match")
    assert [g.tokens for g in sp] == [g.tokens for g in ar]
    kw = {"max_new_tokens": 21, "block_len": 4, "temperature": 1.0, "top_p": 0.95, "acceptance": "rejection"}
    batched = generate(model, PROMPTS, mode="linear", seed=[11, 12, 13, 14], **kw)
    for p, s, g in zip(PROMPTS, [11, 12, 13, 14], batched):
        assert generate(model, [p], mode="linear", seed=s, **kw)[0].tokens == g.tokens


# -- files and bad input ----------------------------------------------------------------------------
def test_save_load_roundtrip_and_load_model_attaches_it(model, tmp_path):
    from trimode.checkpoint import load_model, save_model

    fd = model.feature_drafter
    save_model(model, tmp_path / "m")
    fd.save(tmp_path / "m" / "feature_drafter", training={"steps": 250})
    back = load_feature_drafter(tmp_path / "m" / "feature_drafter", model.config, dtype=torch.float32)
    assert back.meta["training"] == {"steps": 250}
    assert torch.equal(back.ids, fd.ids)
    for (k, a), (_, b) in zip(fd.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    m2 = load_model(tmp_path / "m", dtype=torch.float32)
    assert m2.feature_drafter is not None
    want = generate(model, PROMPTS, mode="linear", block_len=5, max_new_tokens=24, tree_nodes=8)
    got = generate(m2, PROMPTS, mode="linear", block_len=5, max_new_tokens=24, tree_nodes=8)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    assert [g.nfe for g in got] == [g.nfe for g in want]


def test_bad_drafter_files_are_clear_errors(model, tmp_path):
    fd = model.feature_drafter
    d = tmp_path / "fd"
    fd.save(d)
    other = tiny_model(dtype=torch.float32).config.replace(hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_feature_drafter(d, other)
    info = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**info, "ids": [1, 2, 500]}))
    with pytest.raises(ValueError, match="vocabulary must be ids"):
        load_feature_drafter(d, model.config)
    (d / CONFIG_FILE).write_text(json.dumps({**info, "format": 99}))
    with pytest.raises(ValueError, match="format-1"):
        load_feature_drafter(d, model.config)
    (d / CONFIG_FILE).write_text(json.dumps(info))
    (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(ValueError):
        load_feature_drafter(d, model.config)
    with pytest.raises(ValueError, match="holds no feature drafter"):
        load_feature_drafter(tmp_path / "nothing", model.config)
    with pytest.raises(ValueError, match="fits a model"):
        tiny_model(dtype=torch.float32).set_feature_drafter(FeatureDrafter(other, torch.arange(10)))


def test_unrolled_training_sees_what_drafting_sees():
    """Step s of the unrolled training forward at pair j == drafting s + 1 tokens after the true pair
    j - s through the drafter's KV cache, as the decoder does (training and inference agree)."""
    from trimode import masks

    m = tiny_model(dlm_type="dream", dtype=torch.float64)
    fd = init_from_base(FeatureDrafter(m.config, torch.arange(95)), m).to(torch.float64)
    T = 9
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, T, 64, generator=g, dtype=torch.float64)
    emb = torch.randn(1, T, 64, generator=g, dtype=torch.float64)
    pos = torch.arange(1, T + 1)[None]
    store, preds, cur = _Unrolled(), [], feats
    for step in range(3):
        if step:
            cur = torch.cat([feats[:, :1], preds[-1][:, :-1]], dim=1)
        preds.append(fd(cur, emb, pos, mask=unroll_mask(T, step)[None], cache=store))
    for j in (2, 5, 8):
        for step in (1, 2):
            true = j - step  # the last true pair
            dc = fd.new_cache(1, 32)
            mask = masks.with_prefix(masks.causal(true + 1), dc.length, true + 1)
            h = fd(feats[:, : true + 1], emb[:, : true + 1], pos[:, : true + 1], mask=mask, cache=dc)
            dc.commit(true + 1)
            f = h[:, -1:]
            for s in range(1, step + 1):  # chained steps: the feature predicted for the pair before
                i = true + s
                mask = masks.with_prefix(masks.causal(1), dc.length, int(dc.length) + 1)
                f = fd(f, emb[:, i: i + 1], pos[:, i: i + 1], mask=mask, cache=dc)
                dc.commit(1)
            assert torch.allclose(f[0, 0], preds[step][0, j], atol=1e-10), (j, step)


@pytest.mark.parametrize("K,nodes,branch,fewer", [(5, 8, 3, True), (8, 8, 2, True), (8, 12, 3, True), (6, 4, 4, False)])
def test_early_stop_of_tree_drafting_builds_the_same_trees(model, monkeypatch, K, nodes, branch, fewer):
    """Drafting stops once no deeper node can enter the tree (`_settled`): every verify tree, and so
    every output and forward count, equals the one grown to full depth, with fewer drafter steps."""
    from trimode.decode import featdraft

    trees, steps = {}, {}
    real_settled = featdraft.FeatureDraftDecoder._settled
    real_draft = featdraft.FeatureDraftDecoder._draft_tree
    for stop in (False, True):
        got, calls = [], [0]

        def draft(self, *a, got=got, **k):
            t = real_draft(self, *a, **k)
            got.append((t.tokens.clone(), t.parent.clone(), t.depth.clone()))
            return t

        fd = model.feature_drafter
        real_fwd = type(fd).forward

        def fwd(self, *a, calls=calls, real_fwd=real_fwd, **k):
            calls[0] += 1
            return real_fwd(self, *a, **k)

        monkeypatch.setattr(featdraft.FeatureDraftDecoder, "_draft_tree", draft)
        monkeypatch.setattr(featdraft.FeatureDraftDecoder, "_settled",
                            staticmethod(lambda *a, stop=stop: stop and real_settled(*a)))
        monkeypatch.setattr(type(fd), "forward", fwd)
        out = generate(model, PROMPTS + [PROMPT], mode="linear", block_len=K, tree_nodes=nodes, tree_branch=branch,
                       max_new_tokens=40)
        monkeypatch.setattr(type(fd), "forward", real_fwd)
        trees[stop], steps[stop] = (got, [o.tokens for o in out]), calls[0]
    (a, out_a), (b, out_b) = trees[False], trees[True]
    assert out_a == out_b and len(a) == len(b)
    assert steps[True] < steps[False] if fewer else steps[True] == steps[False], steps  # (4 nodes, 4 per depth: never)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_settled_is_exact_on_a_hand_made_frontier():
    settled = __import__("trimode.decode.featdraft", fromlist=["x"]).FeatureDraftDecoder._settled
    nodes = [[[-0.1, 1, 5, -1, None], [-0.5, 1, 6, -1, None], [-3.0, 2, 7, 0, None], [-0.2, 2, 8, 0, None]]]
    assert not settled(nodes, [[3]], 3)  # the frontier node (-0.2) is among the 3 best
    assert settled(nodes, [[2]], 3)      # -3.0 < -0.5, the 3rd best: nothing under it can enter
    assert not settled(nodes, [[2]], 5)  # fewer nodes than the tree holds: keep drafting


@pytest.mark.parametrize("K,nodes", [(5, 8), (8, 8)])
def test_min_prob_stop_drafts_less_and_stays_lossless(model, monkeypatch, K, nodes):
    """tree_min_prob stops drafting deeper once no frontier path is that likely: a different (shallower)
    tree, so fewer drafter steps, but every emitted token is still the verifier's: greedy == AR."""
    fd = model.feature_drafter
    real_fwd = type(fd).forward
    ref = generate(model, PROMPTS + [PROMPT], mode="ar", max_new_tokens=40)
    steps = {}
    for p in (0.0, 0.3):
        calls = [0]

        def fwd(self, *a, calls=calls, **k):
            calls[0] += 1
            return real_fwd(self, *a, **k)

        monkeypatch.setattr(type(fd), "forward", fwd)
        got = generate(model, PROMPTS + [PROMPT], mode="linear", block_len=K, tree_nodes=nodes, max_new_tokens=40,
                       tree_min_prob=p)
        monkeypatch.setattr(type(fd), "forward", real_fwd)
        assert [g.tokens for g in got] == [g.tokens for g in ref], p
        steps[p] = calls[0]
    assert steps[0.3] < steps[0.0], steps


def test_stored_min_prob_is_the_default(model, monkeypatch):
    """A depth cut stored with the model (decoding.json) applies when the caller names none, at the
    stored block length only; an explicit tree_min_prob overrides it."""
    fd = model.feature_drafter
    real_fwd = type(fd).forward
    calls = [0]

    def fwd(self, *a, **k):
        calls[0] += 1
        return real_fwd(self, *a, **k)

    def steps(**kw):
        calls[0] = 0
        generate(model, PROMPTS, mode="linear", max_new_tokens=40, **kw)
        return calls[0]

    monkeypatch.setattr(type(fd), "forward", fwd)
    explicit = steps(block_len=6, tree_nodes=8, tree_min_prob=0.3)
    full = steps(block_len=6, tree_nodes=8, tree_min_prob=0.0)
    monkeypatch.setattr(model, "decoding", {"block_len": {"linear": 6}, "tree_nodes": {"linear": 8},
                                            "tree_min_prob": {"linear": 0.3}}, raising=False)
    assert steps() == explicit < full
    assert steps(block_len=6, tree_min_prob=0.0) == full


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "0.5", True])
def test_min_prob_bad_values_are_clear_errors(model, bad):
    with pytest.raises(ValueError, match="tree_min_prob"):
        generate(model, [PROMPT], mode="linear", block_len=4, tree_nodes=6, max_new_tokens=4, tree_min_prob=bad)


def test_prompt_lookup_path_in_the_tree():
    """With a drafter that knows nothing, the prompt-lookup path alone gets drafts accepted where the
    output repeats itself; output stays AR's with and without it."""
    m = tiny_model(dlm_type="dream", dtype=torch.float32)
    m.set_feature_drafter(FeatureDrafter(m.config, torch.arange(95)).to(torch.float32))  # untrained
    ref = generate(m, PROMPTS, mode="ar", max_new_tokens=48)
    runs = {}
    for lookup in (False, True):
        got = generate(m, PROMPTS, mode="linear", block_len=6, tree_nodes=6, max_new_tokens=48, lookup=lookup)
        assert [g.tokens for g in got] == [g.tokens for g in ref]
        runs[lookup] = sum(g.nfe for g in got)
    assert runs[True] < runs[False], runs


def _tiny_cache(path) -> None:
    """A self-distillation cache of 6 random sequences of 24 tokens (8 prompt + 16 continuation)."""
    g = torch.Generator().manual_seed(0)
    N, L = 6, 24
    toks = torch.randint(10, 200, (N, L), generator=g)
    valid = torch.zeros(N, L, dtype=torch.bool)
    valid[:, 8:] = True
    torch.save({"tokens": toks, "valid": valid, "lengths": torch.full((N,), L), "prompt_lengths": torch.full((N,), 8)},
               path)


def test_cli_train_then_generate_with_the_feature_drafter(tmp_path, capsys):
    """trimode train-feature-drafter on the bundled model (a few steps on a tiny cache), then generate
    with it: output equals AR's; bad flags are clear errors."""
    from trimode.cli import main

    _tiny_cache(tmp_path / "cache.pt")
    out = tmp_path / "fd"
    assert main(["train-feature-drafter", "--model", "bundled", "--data-cache", str(tmp_path / "cache.pt"),
                 "--out", str(out), "--steps", "3", "--batch", "4", "--vocab", "64", "--vocab-from-data",
                 "--unroll", "2", "--eval-every", "3", "--save-every", "3", "--heldout", "0.2"]) == 0
    info = json.loads((out / CONFIG_FILE).read_text())
    assert info["training"]["steps"] == 3 and len(info["ids"]) <= 64 + 1
    capsys.readouterr()
    base = ["generate", "--model", "bundled", "--mode", "linear", "--prompt", "def f(x):", "--max-new-tokens", "12",
            "--json", "--block-len", "4"]
    assert main(base[:4] + ["ar"] + base[5:]) == 0
    ar = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["--feature-drafter", str(out), "--drafter", "feature", "--tree-nodes", "6"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tokens"] == ar["tokens"] and "draft" not in got["forwards"]
    assert main(base + ["--drafter", "feature"]) == 2
    assert "needs a model with a feature drafter" in capsys.readouterr().err
    assert main(base + ["--feature-drafter", str(tmp_path)]) == 2
    assert "holds no feature drafter" in capsys.readouterr().err


# -- multi-layer features (EAGLE-3) -------------------------------------------------------------------
def _tapped_copy(fd: FeatureDrafter, taps=(0,)) -> FeatureDrafter:
    out = FeatureDrafter(fd.base_config, fd.ids, taps).to(fd.dtype)
    missing, unexpected = out.load_state_dict(fd.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("fuse.", "tap_norms.")) for k in missing)
    return out.eval()


def test_model_features_return_the_tapped_layers():
    m = tiny_model(dtype=torch.float64)
    x = torch.tensor([PROMPT])
    h, _, kept = m.features(x, taps=(0, 1))
    assert torch.equal(m.features(x)[0], h)
    assert torch.allclose(m.norm(kept[1]), h, atol=1e-12)  # the last layer's output, normed, is the feature
    assert kept[0].shape == h.shape and not torch.allclose(kept[0], kept[1])
    at = torch.tensor([[1, 3]])
    h2, _, kept2 = m.features(x, at=at, taps=(0,))
    assert torch.allclose(kept2[0], kept[0][:, [1, 3]]) and torch.allclose(h2, h[:, [1, 3]])
    for bad in ((2,), (1, 0), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="taps"):
            m.features(x, taps=bad)


def test_tapped_drafter_starts_as_its_single_layer_source(model):
    """A multi-layer drafter made from a trained one fuses the final feature alone at first: the same
    drafts, so the same tokens and the same number of forwards."""
    m2 = tiny_model(dlm_type="dream", eos=7, dtype=torch.float32)
    m2.set_feature_drafter(_tapped_copy(model.feature_drafter))
    for K, nodes in ((4, 0), (5, 8)):
        want = generate(model, PROMPTS, mode="linear", block_len=K, max_new_tokens=32, tree_nodes=nodes)
        got = generate(m2, PROMPTS, mode="linear", block_len=K, max_new_tokens=32, tree_nodes=nodes)
        assert [g.tokens for g in got] == [g.tokens for g in want]
        assert [g.nfe for g in got] == [g.nfe for g in want]


def test_tapped_drafter_trains_and_stays_lossless(model, tmp_path):
    """Training moves the fusion off the identity (the lower layer is used); greedy still equals AR
    and sampling replays by seed; save / load keeps the taps."""
    fd = _tapped_copy(model.feature_drafter).train()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 90, (5,), generator=g).tolist() for _ in range(12)] + PROMPTS
    tokens, lengths = _continuations(model, prompts, 24)
    L = tokens.shape[1]
    feats, tapped = compute_features(model, tokens, lengths, batch=8, log=lambda s: None, taps=(0,))
    assert tapped.shape == (len(lengths), L, 1, 64)
    with pytest.raises(ValueError, match="taps base layers"):
        pair_loss(fd, model, feats, tokens, lengths, noise=0.0, reg_weight=1.0, ce_weight=0.5)
    opt = torch.optim.AdamW(fd.parameters(), lr=3e-3)
    w0 = fd.fuse.weight.detach().clone()
    for _ in range(20):
        loss, _ = pair_loss(fd, model, feats.float(), tokens, lengths, noise=0.05, reg_weight=1.0, ce_weight=0.5,
                            unroll=2, tapped=tapped.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fd.fuse.weight[:, :64].abs().max() > 0 and not torch.equal(fd.fuse.weight, w0)
    fd.eval().save(tmp_path / "fd")
    assert json.loads((tmp_path / "fd" / CONFIG_FILE).read_text())["taps"] == [0]
    back = load_feature_drafter(tmp_path / "fd", model.config, dtype=torch.float32)
    assert back.taps == (0,) and torch.equal(back.fuse.weight, fd.fuse.weight.float())
    m2 = tiny_model(dlm_type="dream", eos=7, dtype=torch.float32)
    m2.set_feature_drafter(back)
    ref = generate(model, PROMPTS, mode="ar", max_new_tokens=32)
    for K, nodes in ((4, 0), (6, 10)):
        got = generate(m2, PROMPTS, mode="linear", block_len=K, max_new_tokens=32, tree_nodes=nodes)
        assert [x.tokens for x in got] == [x.tokens for x in ref]
    kw = {"max_new_tokens": 20, "block_len": 4, "temperature": 1.0, "acceptance": "match"}
    assert generate(m2, PROMPTS, mode="linear", seed=5, **kw)[0].tokens == \
        generate(m2, PROMPTS[:1], mode="linear", seed=5, **kw)[0].tokens
    info = json.loads((tmp_path / "fd" / CONFIG_FILE).read_text())
    for bad, msg in (([1], "taps must be"), ("0", "'taps' must be")):
        (tmp_path / "fd" / CONFIG_FILE).write_text(json.dumps({**info, "taps": bad}))
        with pytest.raises(ValueError, match=msg):
            load_feature_drafter(tmp_path / "fd", model.config)
    (tmp_path / "fd" / CONFIG_FILE).write_text(json.dumps({**info, "taps": []}))
    with pytest.raises(ValueError, match="unexpected"):  # the weights hold a fusion the config does not
        load_feature_drafter(tmp_path / "fd", model.config)


def test_cli_trains_a_tapped_drafter_from_a_single_layer_one(tmp_path, capsys):
    from trimode.cli import main

    _tiny_cache(tmp_path / "cache.pt")
    common = ["train-feature-drafter", "--model", "bundled", "--data-cache", str(tmp_path / "cache.pt"),
              "--batch", "4", "--eval-every", "2", "--save-every", "2", "--heldout", "0.2"]
    assert main(common + ["--out", str(tmp_path / "a"), "--steps", "2", "--vocab", "64", "--vocab-from-data"]) == 0
    tc = tmp_path / "taps.pt"
    b = common + ["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), "--taps", "1",
                  "--taps-cache", str(tc)]
    assert main(b + ["--steps", "2"]) == 0
    assert torch.load(tc)["taps"] == [1]
    assert json.loads((tmp_path / "b" / CONFIG_FILE).read_text())["taps"] == [1]
    capsys.readouterr()
    assert main(b + ["--steps", "4"]) == 0  # resumes, reads the taps cache
    err = capsys.readouterr().out
    assert "resuming" in err and "from " + str(tc) in err
    assert main(common + ["--out", str(tmp_path / "b"), "--taps", "2", "--steps", "5"]) == 2
    assert "not --taps [2]" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "c"), "--taps", "99", "--steps", "1"]) == 2
    assert "taps must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "c"), "--taps", "x", "--steps", "1"])
    assert "comma-separated layer indices" in capsys.readouterr().err
    fd = tmp_path / "b"
    base = ["generate", "--model", "bundled", "--mode", "linear", "--prompt", "def f(x):", "--max-new-tokens", "12",
            "--json", "--block-len", "4"]
    assert main(base[:4] + ["ar"] + base[5:]) == 0
    ar = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["--feature-drafter", str(fd), "--drafter", "feature", "--tree-nodes", "6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == ar["tokens"]


def test_ragged_store_gives_back_the_padded_sequences():
    from trimode.train.feature_drafter import Ragged

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 5, 1, 4])
    padded = torch.randn(4, 6, 2, generator=g)
    padded[torch.arange(6)[None, :] >= lengths[:, None]] = 0
    r = Ragged(padded[torch.arange(6)[None, :] < lengths[:, None]], lengths)
    assert torch.equal(r[[1, 3]], padded[[1, 3], :5])
    assert torch.equal(r[[2]], padded[[2], :1]) and torch.equal(r[[0, 2]], padded[[0, 2], :3])
    with pytest.raises(ValueError, match="rows for sequences"):
        Ragged(torch.zeros(5, 2), lengths)


# -- deeper drafters (more than one decoder layer) -----------------------------------------------------
def _grown_copy(fd: FeatureDrafter, layers: int = 2) -> FeatureDrafter:
    from trimode.feature_drafter import init_extra_blocks

    base = tiny_model(dlm_type="dream", eos=7, dtype=torch.float32)
    out = FeatureDrafter(fd.base_config, fd.ids, fd.taps, layers).to(fd.dtype)
    missing, unexpected = out.load_state_dict(fd.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("more.") for k in missing)
    return init_extra_blocks(out, base, first=fd.layers).eval()


def test_grown_drafter_starts_as_its_source_then_trains_and_stays_lossless(model, tmp_path):
    """A 2-layer drafter grown from a trained 1-layer one drafts exactly as it at first (same tokens,
    same forwards); after training its second layer it still equals AR greedy, the unrolled training
    store keeps the layers apart (cached drafting == the training forward), and save / load keeps
    its depth."""
    fd2 = _grown_copy(model.feature_drafter)
    assert fd2.layers == 2 and len(fd2.new_cache(1, 8).k) == 2
    m2 = tiny_model(dlm_type="dream", eos=7, dtype=torch.float32)
    m2.set_feature_drafter(fd2)
    for K, nodes in ((4, 0), (5, 8)):
        want = generate(model, PROMPTS, mode="linear", block_len=K, max_new_tokens=32, tree_nodes=nodes)
        got = generate(m2, PROMPTS, mode="linear", block_len=K, max_new_tokens=32, tree_nodes=nodes)
        assert [g.tokens for g in got] == [g.tokens for g in want] and [g.nfe for g in got] == [g.nfe for g in want]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 90, (5,), generator=g).tolist() for _ in range(12)] + PROMPTS
    tokens, lengths = _continuations(model, prompts, 24)
    feats = compute_features(model, tokens, lengths, batch=8, log=lambda s: None).float()
    fd2 = _grown_copy(model.feature_drafter).train()  # a fresh copy (decoding fused the first one's projections)
    opt = torch.optim.AdamW(fd2.parameters(), lr=3e-3)
    for _ in range(20):
        loss, _ = pair_loss(fd2, model, feats, tokens, lengths, noise=0.05, reg_weight=1.0, ce_weight=0.5, unroll=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fd2.eval()
    assert fd2.more[0].mlp.down_proj.weight.abs().max() > 0  # the new layer now adds to the residual
    # the unrolled store: step 1 of the training forward == drafting one step after a cached prefix
    T = 6
    f, e, pos = feats[:1, :T], model.embed_tokens(tokens[:1, 1:T + 1]), torch.arange(1, T + 1)[None]
    with torch.no_grad():
        store = _Unrolled()
        p0 = fd2(f, e, pos, mask=unroll_mask(T, 0)[None], cache=store)
        cur = torch.cat([f[:, :1], p0[:, :-1]], dim=1)
        p1 = fd2(cur, e, pos, mask=unroll_mask(T, 1)[None], cache=store)
        j = 4  # step 1 at pair j: true pairs <= j - 1, then (f^_{j-1}, x_{j+1})
        pre = fd2(f[:, :j], e[:, :j], pos[:, :j])
        one = fd2(torch.cat([f[:, :j], p0[:, j - 1:j]], dim=1), torch.cat([e[:, :j], e[:, j:j + 1]], dim=1),
                  torch.cat([pos[:, :j], pos[:, j:j + 1]], dim=1))
    assert torch.allclose(pre, p0[:, :j], atol=1e-5) and torch.allclose(one[:, -1], p1[:, j], atol=1e-5)
    ref = generate(model, PROMPTS, mode="ar", max_new_tokens=32)
    m2.set_feature_drafter(fd2)
    for K, nodes in ((4, 0), (6, 10)):
        got = generate(m2, PROMPTS, mode="linear", block_len=K, max_new_tokens=32, tree_nodes=nodes)
        assert [x.tokens for x in got] == [x.tokens for x in ref]
    fd2.save(tmp_path / "fd")
    info = json.loads((tmp_path / "fd" / CONFIG_FILE).read_text())
    assert info["layers"] == 2
    back = load_feature_drafter(tmp_path / "fd", model.config, dtype=torch.float32)
    assert back.layers == 2 and torch.equal(back.more[0].mlp.down_proj.weight, fd2.more[0].mlp.down_proj.weight)
    for bad, msg in ((0, "1 to 2 layers"), (3, "1 to 2 layers"), ("2", "'layers' must be"), (True, "'layers' must")):
        (tmp_path / "fd" / CONFIG_FILE).write_text(json.dumps({**info, "layers": bad}))
        with pytest.raises(ValueError, match=msg):
            load_feature_drafter(tmp_path / "fd", model.config)
    (tmp_path / "fd" / CONFIG_FILE).write_text(json.dumps({**info, "layers": 1}))
    with pytest.raises(ValueError, match="unexpected"):  # the weights hold a layer the config does not
        load_feature_drafter(tmp_path / "fd", model.config)


def test_cli_grows_a_drafter_by_a_layer(tmp_path, capsys):
    from trimode.cli import main

    _tiny_cache(tmp_path / "cache.pt")
    common = ["train-feature-drafter", "--model", "bundled", "--data-cache", str(tmp_path / "cache.pt"),
              "--batch", "4", "--eval-every", "2", "--save-every", "2", "--heldout", "0.2"]
    assert main(common + ["--out", str(tmp_path / "a"), "--steps", "2", "--vocab", "64", "--vocab-from-data"]) == 0
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["layers"] == 1
    capsys.readouterr()
    b = common + ["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), "--layers", "2", "--lr-new", "1e-2"]
    assert main(b + ["--steps", "2"]) == 0
    assert "grown to 2 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / CONFIG_FILE).read_text())["layers"] == 2
    from trimode.train.feature_drafter import STATE

    st = torch.load(tmp_path / "b" / STATE, weights_only=False)
    assert st["new_params"] and all(k.startswith("more.0.") for k in st["new_params"])
    lrs = [g["lr"] / g["scale"] for g in st["opt"]["param_groups"]]  # one schedule, the new group 10x
    assert [g["scale"] for g in st["opt"]["param_groups"]] == [1.0, pytest.approx(10.0)]
    assert lrs[0] == pytest.approx(lrs[1])
    assert main(b + ["--steps", "4"]) == 0 and "resuming" in capsys.readouterr().out
    assert main(common + ["--out", str(tmp_path / "b"), "--layers", "3", "--steps", "5"]) == 2
    assert "not --layers 3" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "c"), "--init", str(tmp_path / "b"), "--layers", "1",
                          "--steps", "1"]) == 2
    assert "cannot shrink" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "d"), "--layers", "99", "--steps", "1"]) == 2
    assert "layers (the base's)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "d"), "--layers", "0", "--steps", "1"])
    assert "--layers must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "d"), "--lr-new", "0", "--steps", "1"])
    assert "--lr-new must be > 0" in capsys.readouterr().err
    base = ["generate", "--model", "bundled", "--mode", "linear", "--prompt", "def f(x):", "--max-new-tokens", "12",
            "--json", "--block-len", "4"]
    assert main(base[:4] + ["ar"] + base[5:]) == 0
    ar = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["--feature-drafter", str(tmp_path / "b"), "--drafter", "feature", "--tree-nodes", "6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == ar["tokens"]


def test_int8_packed_drafter(model):
    """pack_int8: the packed matmul equals x times its dequantized weight (bf16 rounding); the packed
    drafter's features stay close to the bf16 drafter's and decoding with it still equals AR greedy
    of the same bf16 model where the bf16 drafter does (drafts change, emitted tokens do not); a
    float32 drafter is refused with a clear error."""
    import copy

    from trimode.quant import Int8Packed

    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 64, generator=g), torch.randn(48, generator=g), torch.randn(3, 64, generator=g)
    q = Int8Packed(w, b)
    ref = x.bfloat16().float() @ q.dequantize().bfloat16().float().t() + b.bfloat16().float()
    assert torch.allclose(q(x.bfloat16()).float(), ref, rtol=2e-2, atol=5e-2)
    # per row: half an int8 step plus the bf16 rounding of the row's scale (at most 127 steps of it)
    assert bool(((q.dequantize() - w).abs().amax(dim=1) <= w.abs().amax(dim=1) * (1 / 254 + 1 / 256)).all())
    with pytest.raises(ValueError, match="packed CPU kernel in bf16"):
        copy.deepcopy(model.feature_drafter).pack_int8()
    m16 = tiny_model(dlm_type="dream", eos=7, dtype=torch.bfloat16)
    fd16 = copy.deepcopy(model.feature_drafter).to(torch.bfloat16)
    packed = copy.deepcopy(fd16).pack_int8()
    assert packed.pack_int8() is packed and packed.int8
    f = torch.randn(1, 5, 64, generator=g).bfloat16()
    e = m16.embed_tokens(torch.tensor([PROMPT + [9]]))
    pos = torch.arange(1, 6)[None]
    a, p = fd16(f, e, pos).float(), packed(f, e, pos).float()
    assert (a - p).abs().max() < 0.1 * a.abs().max()
    za, _ = fd16.logits(m16, a.bfloat16())
    zp, _ = packed.logits(m16, a.bfloat16())
    assert (za.float() - zp.float()).abs().max() < 0.1 * za.float().abs().max()
    ar = generate(m16, PROMPTS, mode="ar", max_new_tokens=24)
    for d in (fd16, packed):
        m16.set_feature_drafter(d)
        got = generate(m16, PROMPTS, mode="linear", block_len=5, max_new_tokens=24, tree_nodes=8)
        agree = sum(x.tokens == y.tokens for x, y in zip(got, ar))
        assert agree >= len(PROMPTS) - 1, (d.int8, agree)  # bf16: at most a near-tie apart
