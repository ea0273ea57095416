"""Draft vocabularies: draft passes score a token subset; verify passes keep the whole vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import PROMPTS, tiny_model

from trimode import draftvocab, generate
from trimode.peft import load_adapter, save_adapter


def test_draft_head_over_every_id_is_the_head_and_a_subset_masks_the_rest():
    m = tiny_model(adapter=True)
    h = torch.randn(2, 3, m.config.hidden_size, dtype=torch.float64)
    full = m.head(h)
    m.set_draft_vocab(torch.arange(m.config.vocab_size))
    assert torch.equal(m.draft_head(h), full)
    ids = torch.tensor([3, 17, 40, 41, 90])
    m.set_draft_vocab(ids.flip(0).tolist() + [17])  # any order, repeats folded
    got = m.draft_head(h)
    assert torch.equal(m.draft_vocab, ids)
    # A matmul over 5 gathered rows may block (and so round) differently from one over all 96, even
    # in float64 on some BLAS builds: equal to the last few ulps, not bit for bit.
    torch.testing.assert_close(got[..., ids], full[..., ids], rtol=1e-12, atol=1e-12)
    outside = torch.ones(m.config.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(got[..., outside]).all()
    m.set_draft_vocab(None)
    assert torch.equal(m.draft_head(h), full)


def test_draft_rows_follow_the_weights():
    m = tiny_model()
    m.set_draft_vocab([1, 2, 5])
    h = torch.randn(1, 1, m.config.hidden_size, dtype=torch.float64)
    before = m.draft_head(h)
    with torch.no_grad():
        m.head_weight().mul_(2.0)  # in place (training, loading): the gathered rows must not go stale
    assert torch.allclose(m.draft_head(h)[..., [1, 2, 5]], 2 * before[..., [1, 2, 5]])
    m.to(torch.float32)
    assert m.draft_head(h.float()).dtype == torch.float32


@pytest.mark.parametrize("dlm_type", ["llada", "dream"])
@pytest.mark.parametrize("mode,kw", [("linear", {"block_len": 4}), ("linear", {"block_len": 6, "tree_nodes": 10}),
                                     ("quadratic", {"block_len": 3})])
def test_greedy_with_a_draft_vocab_equals_ar_and_drafts_stay_inside(dlm_type, mode, kw):
    m = tiny_model(dlm_type=dlm_type, adapter=True, eos=7)
    ref = generate(m, PROMPTS, mode="ar", max_new_tokens=40)
    out = sorted({t for g in ref for t in g.tokens})
    m.set_draft_vocab([i for i in range(96) if i not in out[::2]])  # without half of what AR writes
    got = generate(m, PROMPTS, mode=mode, max_new_tokens=40, **kw)
    assert [g.tokens for g in got] == [g.tokens for g in ref]


@pytest.mark.parametrize("mode,kw", [("linear", {"block_len": 6}), ("linear", {"block_len": 6, "tree_nodes": 12}),
                                     ("quadratic", {"block_len": 4})])
def test_a_model_that_drafts_keeps_its_output_and_loses_only_the_excluded_drafts(mode, kw):
    from trimode.checkpoint import load_model
    from trimode.models import BUNDLED

    m = load_model(BUNDLED, dtype=torch.float32)
    prompts = [[5, 60, 61, 62, 9, 300, 301], [70, 71, 72, 73], [400, 401, 402, 9, 403]]
    ref = generate(m, prompts, mode="ar", max_new_tokens=32)
    full = generate(m, prompts, mode=mode, max_new_tokens=32, **kw)
    written = torch.bincount(torch.tensor([t for g in ref for t in g.tokens]), minlength=m.config.vocab_size)
    # Every token AR writes here: a draft changes only where it was a token AR never writes (wrong).
    m.set_draft_vocab(torch.nonzero(written).flatten())
    same = generate(m, prompts, mode=mode, max_new_tokens=32, **kw)
    # None of them: only what the rows' prompts and outputs so far hold can be drafted.
    m.set_draft_vocab(torch.nonzero(written == 0).flatten())
    none = generate(m, prompts, mode=mode, max_new_tokens=32, **kw)
    assert [g.tokens for g in same] == [g.tokens for g in none] == [g.tokens for g in full] == [g.tokens for g in ref]
    nfe = lambda gs: sum(g.stats["nfe"] for g in gs)  # noqa: E731
    assert nfe(same) <= nfe(full) and nfe(same) <= nfe(none)
    assert max(a for g in full for a in g.stats["acceptance"]) >= 2


def test_drafts_may_copy_the_prompt_and_the_output_so_far():
    from trimode.decode import DecodeConfig, Row, make_decoder

    m = tiny_model(adapter=True)
    m.set_draft_vocab([0, 1])
    rows = [Row([5, 6, 60], max_new_tokens=12, index=0), Row([7, 61], max_new_tokens=12, index=1)]
    dec = make_decoder(m, "linear", DecodeConfig(max_new_tokens=12, block_len=4))
    dec.admit(rows)
    dec.cycle()
    while not dec.idle:
        allowed = {0, 1} | {t for r in dec.running for t in [*r.prompt, *r.tokens]}
        live = torch.isfinite(dec.draft_logits(dec.state.newest, 4)).any(0).any(0)
        assert set(torch.nonzero(live).flatten().tolist()) == allowed - {m.config.mask_token_id}
        dec.cycle()


def test_rejection_sampling_with_a_draft_vocab_is_lossless():
    from test_sampling_e2e import KW, N_SAMPLES, PROMPT, _pvalue, _tuples

    m = tiny_model(adapter=True)
    ar = generate(m, [PROMPT] * N_SAMPLES, mode="ar", max_new_tokens=3, seed=0, **KW)
    # Drop half of the tokens AR samples most: q is then 0 where p is large (the residual covers it).
    common = torch.bincount(torch.tensor([t for g in ar for t in g.tokens]), minlength=96).argsort(descending=True)
    m.set_draft_vocab([i for i in range(96) if i not in set(common[:8:2].tolist())])
    for mode in ("linear", "quadratic"):
        gens = generate(m, [PROMPT] * N_SAMPLES, mode=mode, max_new_tokens=3, block_len=4, seed=N_SAMPLES,
                        acceptance="rejection", **KW)
        assert _pvalue(_tuples(ar), _tuples(gens)) >= 1e-3


@pytest.mark.parametrize("bad,match", [([], "non-empty"), ([1.5], "integer"), ([0, 96], r"\[0, 96\)"),
                                       ([-1], r"\[0, 96\)"), ([[1, 2]], "1-d")])
def test_bad_draft_vocabularies(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model().set_draft_vocab(bad)


def test_from_counts_and_coverage():
    counts = torch.tensor([0, 5, 9, 9, 1, 0, 3])
    assert draftvocab.from_counts(counts, 3).tolist() == [1, 2, 3]  # 9, 9, 5
    assert draftvocab.from_counts(counts, 3, keep=[4], drop=[2]).tolist() == [1, 3, 4, 6]
    assert draftvocab.from_counts(counts, 100).tolist() == [1, 2, 3, 4, 6]  # never a token that was not seen
    assert draftvocab.coverage(torch.tensor([1, 2]), torch.tensor([1, 1, 2, 3]), 7) == 0.75
    with pytest.raises(ValueError, match="size"):
        draftvocab.from_counts(counts, 0)


def test_the_vocab_travels_with_the_adapter(tmp_path):
    m = tiny_model(adapter=True)
    m.set_draft_vocab([2, 4, 8])
    save_adapter(m, "draft", tmp_path / "a")
    body = json.loads((tmp_path / "a" / draftvocab.FILE).read_text())
    assert body["ids"] == [2, 4, 8] and body["vocab_size"] == 96
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "a")
    assert fresh.draft_vocab.tolist() == [2, 4, 8]


@pytest.mark.parametrize("body,match", [
    ("{not json", "not valid JSON"),
    ('{"format": 2, "vocab_size": 96, "ids": [1]}', "format 1"),
    ('{"format": 1, "vocab_size": 49152, "ids": [1]}', "another model"),
    ('{"format": 1, "vocab_size": 96, "ids": [1, 200]}', "token ids"),
    ('{"format": 1, "vocab_size": 96, "ids": [true]}', "token ids"),
])
def test_a_bad_vocab_file_is_a_clear_error_and_leaves_the_model_alone(tmp_path, body, match):
    m = tiny_model(adapter=True)
    save_adapter(m, "draft", tmp_path / "a")
    (tmp_path / "a" / draftvocab.FILE).write_text(body)
    fresh = tiny_model()
    with pytest.raises(ValueError, match=match):
        load_adapter(fresh, tmp_path / "a")
    assert fresh.draft_vocab is None and "draft" not in fresh.adapter_names()


def test_corpus_counts_use_training_splits_only(tmp_path):
    class Chars:  # one token per character
        def encode(self, s):
            return [ord(ch) % 128 for ch in s]

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "mbpp").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(json.dumps({"question": "Q", "answer": "A"}) + "\n")
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(
        json.dumps({"task_id": 600, "text": "T", "code": "C"}) + "\n"
        + json.dumps({"task_id": 100, "text": "Z", "code": "Z"}) + "\n")  # a held-out test task
    c = draftvocab.corpus_counts(Chars(), 128, data=tmp_path, stdlib=False)
    assert set(c) == {"data"}
    for ch in "QATC":
        assert c["data"][ord(ch)] >= 1
    assert c["data"][ord("Z")] == sum(t.count("Z") for t in __import__("trimode").prompts.chat_train_texts())
    mix = draftvocab.mixture(torch.tensor([2.0, 0, 2]), torch.tensor([0.0, 10, 0]))
    assert torch.allclose(mix, torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_head_is_gathered_from_its_codes(scheme):
    from trimode.checkpoint import load_model
    from trimode.models import BUNDLED, for_inference

    dtype = torch.bfloat16 if scheme == "int4" else torch.float32
    m = for_inference(load_model(BUNDLED, dtype=dtype, quantize=scheme))  # untied head: its weight is int8 codes
    h = torch.randn(1, 3, m.config.hidden_size, dtype=dtype)
    m.set_draft_vocab(torch.arange(m.config.vocab_size))
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert torch.allclose(m.draft_head(h).float(), m.head(h).float(), atol=tol, rtol=tol)
    prompts = [[5, 60, 61, 62, 9, 300, 301], [70, 71, 72, 73]]
    ref = generate(m, prompts, mode="ar", max_new_tokens=24)
    m.set_draft_vocab(torch.arange(0, m.config.vocab_size, 2))
    for mode in ("linear", "quadratic"):
        got = generate(m, prompts, mode=mode, max_new_tokens=24, block_len=4)
        assert all(len(g.tokens) == 24 for g in got)
        if scheme == "int8":  # int8 keeps float32 numerics: exact; int4 runs bf16 (equal up to near-ties)
            assert [g.tokens for g in got] == [g.tokens for g in ref]
