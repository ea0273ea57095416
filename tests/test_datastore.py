"""The n-gram datastore (trimode/datastore.py): lookups against a brute-force oracle, files, bad input,
and its path in the feature drafter's trees (greedy output stays AR's, fewer forwards)."""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest
import torch
from _tiny import PROMPTS, tiny_model

from trimode import generate
from trimode.datastore import FILE, NgramStore, build, load_datastore
from trimode.feature_drafter import FeatureDrafter, load_feature_drafter


def _brute_next(seqs, ctx, orders):
    """Longest suffix of ctx (order in `orders`) found inside one sequence with a next token there:
    (most frequent follower, smallest id on ties; order; its share), else None."""
    for n in sorted(orders, reverse=True):
        if len(ctx) < n:
            continue
        key = ctx[-n:]
        nxt = collections.Counter(s[i + n] for s in seqs for i in range(len(s) - n) if s[i: i + n] == key)
        if nxt:
            best = max(nxt.values())
            tok = min(t for t, c in nxt.items() if c == best)
            return tok, n, best / sum(nxt.values())
    return None


def test_next_token_matches_a_brute_force_search():
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(2, 30))] for _ in range(40)]
    st = NgramStore(seqs, orders=(1, 2, 3, 4), vocab_size=6)
    for _ in range(300):
        ctx = [rng.randrange(7) for _ in range(rng.randrange(1, 8))]  # 6: an id the store never saw
        got, want = st.next_token(ctx), _brute_next(seqs, ctx, (1, 2, 3, 4))
        if want is None:
            assert got is None
        else:
            assert got is not None and got[:2] == want[:2] and got[2] == pytest.approx(want[2])


def test_ngrams_do_not_cross_sequence_boundaries():
    st = NgramStore([[1, 2, 3], [4, 5, 6]], orders=(2,))
    assert st.next_token([2, 3]) is None  # 2, 3 ends its sequence: 4 follows it only across the boundary
    assert st.next_token([3, 4]) is None
    assert st.next_token([1, 2])[:2] == (3, 2)
    assert st.continuation([9, 4, 5], 5) == [6]


def test_continuation_chains_and_stops_on_share_order_and_path():
    seqs = [[1, 2, 3, 4, 5]] * 3 + [[1, 2, 3, 9]]
    st = NgramStore(seqs, orders=(2, 3))
    assert st.continuation([1, 2], 5) == [3, 4, 5]
    assert st.continuation([1, 2], 2) == [3, 4]
    assert st.continuation([1, 2], 5, min_share=0.8) == [3]  # after 1 2 3: 4 has 3/4 of the matches
    assert st.continuation([1, 2], 5, min_path=0.7) == [3, 4, 5]  # path shares 1, 0.75, 0.75
    assert st.continuation([1, 2], 5, min_path=0.8) == [3]
    assert st.continuation([7, 2, 3], 5) == [4, 5]  # 7 2 3 is not in the store: backs off to 2 3
    assert st.continuation([7, 2, 3], 5, min_order=3) == []
    assert st.continuation([8, 8], 3) == []


def test_save_load_roundtrip_and_bad_files(tmp_path):
    seqs = [[5, 6, 7, 8], [70000, 1, 2]]
    st = NgramStore(seqs, vocab_size=80000, min_share=0.25)
    st.save(tmp_path)
    back = load_datastore(tmp_path, vocab_size=80000)
    assert back.min_share == 0.25 and back.orders == st.orders and back.tokens.dtype == np.int32
    assert back.continuation([5, 6], 3) == [7, 8] and back.continuation([70000, 1], 2) == [2]
    small = NgramStore([[5, 6, 7]], vocab_size=100)
    assert small.tokens.dtype == np.uint16
    with pytest.raises(ValueError, match="vocabulary of 80000"):
        load_datastore(tmp_path, vocab_size=100)
    (tmp_path / FILE).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable trimode datastore"):
        load_datastore(tmp_path)
    np.savez(tmp_path / FILE, tokens=np.arange(4), starts=np.array([0]), orders=np.array([2]),
             version=np.array(99), min_share=np.array(0.3), vocab_size=np.array(-1))
    with pytest.raises(ValueError, match="datastore version 99"):
        load_datastore(tmp_path)
    np.savez(tmp_path / FILE, tokens=np.arange(4), starts=np.array([0, 9]), orders=np.array([2]),
             version=np.array(1), min_share=np.array(0.3), vocab_size=np.array(-1))
    with pytest.raises(ValueError, match="damaged datastore"):
        load_datastore(tmp_path)
    with pytest.raises(ValueError, match="token ids must lie"):
        NgramStore([[1, 200]], vocab_size=100)
    with pytest.raises(ValueError, match="at least one sequence"):
        NgramStore([[1]])
    with pytest.raises(ValueError, match="min_share"):
        NgramStore([[1, 2]], min_share=1.5)


def _store_of_own_outputs(m, n_tokens=48) -> NgramStore:
    """The tiny model's own greedy continuations of the test prompts, as a datastore."""
    outs = generate(m, PROMPTS, mode="ar", max_new_tokens=n_tokens)
    return NgramStore([p + o.tokens for p, o in zip(PROMPTS, outs)], vocab_size=m.config.vocab_size)


def test_datastore_path_in_the_tree_is_lossless_and_saves_forwards():
    """An untrained drafter (its drafts rarely right) with a datastore of the model's own continuations:
    the retrieved path gets drafts accepted, output stays AR's with it, without it and with
    datastore=False; and the prompt-lookup path is independent of it."""
    m = tiny_model(dlm_type="dream", dtype=torch.float32)
    fd = FeatureDrafter(m.config, torch.arange(95)).to(torch.float32)
    m.set_feature_drafter(fd)
    ref = generate(m, PROMPTS, mode="linear", block_len=1, max_new_tokens=48)
    ar = generate(m, PROMPTS, mode="ar", max_new_tokens=48)
    assert [g.tokens for g in ref] == [g.tokens for g in ar]
    fd.datastore = _store_of_own_outputs(m)
    nfe = {}
    for ds in (False, True):
        for lookup in (False, True):
            got = generate(m, PROMPTS, mode="linear", block_len=6, tree_nodes=4, max_new_tokens=48,
                           lookup=lookup, datastore=ds)
            assert [g.tokens for g in got] == [g.tokens for g in ar], (ds, lookup)
            nfe[ds, lookup] = sum(g.nfe for g in got)
            acc = [a for g in got for a in g.stats["acceptance"]]
            assert all(1 <= a <= 6 for a in acc)
    assert nfe[True, False] < nfe[False, False] and nfe[True, True] <= nfe[False, True], nfe
    with pytest.raises(ValueError, match="datastore must be True or False"):
        generate(m, PROMPTS, mode="linear", block_len=4, max_new_tokens=4, datastore="yes")


def test_batched_rows_with_the_datastore_decode_as_alone():
    m = tiny_model(dlm_type="dream", dtype=torch.float32)
    fd = FeatureDrafter(m.config, torch.arange(95)).to(torch.float32)
    m.set_feature_drafter(fd)
    fd.datastore = _store_of_own_outputs(m)
    alone = [generate(m, [p], mode="linear", block_len=5, tree_nodes=4, max_new_tokens=40)[0].tokens for p in PROMPTS]
    batched = generate(m, PROMPTS, mode="linear", block_len=5, tree_nodes=4, max_new_tokens=40)
    assert [g.tokens for g in batched] == alone


def test_cli_builds_a_datastore_that_loads_with_the_drafter(tmp_path, capsys):
    from trimode.cli import main

    m = tiny_model(dlm_type="dream", dtype=torch.float32)
    fd = FeatureDrafter(m.config, torch.arange(95))
    fd.save(tmp_path / "fd")
    outs = generate(m, PROMPTS, mode="ar", max_new_tokens=24)
    seqs = [p + o.tokens for p, o in zip(PROMPTS, outs)]
    L = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), L + 3, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    cache = tmp_path / "cache.pt"
    torch.save({"tokens": tokens, "lengths": torch.tensor([len(s) for s in seqs]),
                "prompt_lengths": torch.tensor([len(p) for p in PROMPTS])}, cache)
    assert main(["build-datastore", "--data-cache", str(cache), "--out", str(tmp_path / "fd")]) == 0
    assert "wrote" in capsys.readouterr().out
    back = load_feature_drafter(tmp_path / "fd", m.config)
    assert back.datastore is not None and len(back.datastore) == sum(map(len, seqs))
    assert back.datastore.continuation(seqs[0][:len(PROMPTS[0]) + 2], 4) == seqs[0][len(PROMPTS[0]) + 2:][:4]
    # --continuations-only indexes the generated tokens alone
    assert build([str(cache)], tmp_path / "fd", continuations_only=True).starts.tolist() == \
        np.cumsum([0] + [len(o.tokens) for o in outs[:-1]]).tolist()
    # bad input: a directory without a drafter, a foreign cache, a pickle with code, bad flags
    assert main(["build-datastore", "--data-cache", str(cache), "--out", str(tmp_path)]) == 2
    assert "holds no feature drafter" in capsys.readouterr().err
    torch.save({"x": torch.zeros(2)}, tmp_path / "bad.pt")
    assert main(["build-datastore", "--data-cache", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "fd")]) == 2
    assert "holds 'tokens' and 'lengths'" in capsys.readouterr().err
    torch.save({"tokens": tokens, "lengths": torch.tensor([L + 9] * len(seqs))}, tmp_path / "long.pt")
    assert main(["build-datastore", "--data-cache", str(tmp_path / "long.pt"), "--out", str(tmp_path / "fd")]) == 2
    assert "outside its row" in capsys.readouterr().err
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(collections.OrderedDict))
    assert main(["build-datastore", "--data-cache", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "fd")]) == 2
    assert "never unpickles" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build-datastore", "--data-cache", str(cache), "--out", str(tmp_path / "fd"), "--orders", "a"])
    assert json.loads((tmp_path / "fd" / "feature_drafter.json").read_text())["format"]


def test_generate_cli_with_and_without_the_datastore(tmp_path, capsys):
    """trimode generate on the bundled model with a feature drafter whose directory holds a datastore of
    the model's own continuation: --no-datastore or not, the tokens are AR's, and the datastore run needs
    fewer forwards (its drafter is untrained, so the retrieved path is what gets accepted)."""
    from trimode.checkpoint import load_model
    from trimode.cli import main
    from trimode.models import resolve_model
    from trimode.tokenizer import load_tokenizer

    path = resolve_model("bundled")
    m = load_model(path, dtype=torch.float32)
    tok = load_tokenizer(path)
    ids = tok.encode("def f(x):")
    ar = generate(m, [ids], mode="ar", max_new_tokens=24)[0].tokens
    FeatureDrafter(m.config, torch.arange(m.config.vocab_size)).save(tmp_path / "fd")
    NgramStore([ids + ar], vocab_size=m.config.vocab_size).save(tmp_path / "fd")
    base = ["generate", "--model", "bundled", "--mode", "linear", "--prompt", "def f(x):", "--max-new-tokens", "24",
            "--json", "--block-len", "5", "--dtype", "float32", "--feature-drafter", str(tmp_path / "fd"),
            "--drafter", "feature", "--tree-nodes", "6"]
    runs = {}
    for flag in ([], ["--no-datastore"]):
        assert main(base + flag) == 0
        runs[bool(flag)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert runs[bool(flag)]["tokens"] == ar
    assert runs[False]["nfe"] < runs[True]["nfe"], runs
