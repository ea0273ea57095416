"""Corpus reading, chat loss masks, BPE training, packing, whole-file splits, plotting."""

import importlib.util
import json

import pytest
import torch

from trimode.train import data as D
from trimode.train.plot import main as plot_main
from trimode.train.plot import read_log


def test_resolve_files_dirs_globs_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_text("x = 1\n")
    (tmp_path / "a" / "empty.py").write_text("")
    (tmp_path / "a" / "skip.bin").write_text("zz")
    (tmp_path / "a" / "tests").mkdir()
    (tmp_path / "a" / "tests" / "t.py").write_text("t = 1\n")
    files = D.resolve_files([str(tmp_path / "a")], exclude=["*/tests/*"])
    assert [f.key for f in files] == ["x.py"]
    assert [f.key for f in D.resolve_files([str(tmp_path / "a" / "*.py")])][0].endswith("x.py")
    with pytest.raises(ValueError, match="empty"):
        D.resolve_files([str(tmp_path / "a" / "empty.py")])
    with pytest.raises(ValueError, match="does not exist"):
        D.resolve_files([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="no corpus files"):
        D.resolve_files([str(tmp_path / "a")], suffixes=(".md",))
    assert len(D.resolve_files([D.STDLIB], suffixes=(".py",), max_file_bytes=10_000)) > 10


def test_jsonl_text_and_chat_documents(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "hello"}, {"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = D.read_documents(p)
    assert docs[0] == [("hello", True)]
    assert docs[1] == [("<|im_start|>user\n", False), ("hi<|im_end|>", False), ("\n", False),
                       ("<|im_start|>assistant\n", False), ("yo<|im_end|>", True), ("\n", False)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        D.read_documents(bad)


def test_bpe_specials_encode_and_pack(tmp_path):
    tok = D.train_bpe_tokenizer(["def f(x):\n    return x\n"] * 50, vocab_size=300)
    assert [tok.token_to_id(t) for t in D.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    D.save_tokenizer_dir(tok, tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["mask_token"] == "<|mask|>" and "im_start" in cfg["chat_template"]
    doc = [("<|im_start|>user\n", False), ("q<|im_end|>", False), ("a<|im_end|>", True)]
    ids, sup = D.encode_document(tok, doc, eos_id=0)
    assert ids[0] == 3 and ids[-1] == 0 and sup[-1] and not sup[0]
    assert ids[-2] == 4 and sup[-2]  # the assistant's end tag is supervised
    t, m = D.pack([([1, 2, 3], [True] * 3), ([4, 5, 6, 7, 8], [False, True, True, True, True])], 3)
    assert t.tolist() == [[1, 2, 3], [4, 5, 6]] and m.tolist() == [[True] * 3, [False, True, True]]
    assert t.dtype == torch.long and m.dtype == torch.bool


def test_split_by_whole_files_is_stable():
    files = [D.CorpusFile(path=None, key=f"f{i}.py") for i in range(200)]
    train, val = D.split_files(files, 0.1, seed=0)
    assert 5 < len(val) < 40 and len(train) + len(val) == 200
    assert {f.key for f in val}.isdisjoint({f.key for f in train})
    assert D.split_files(files, 0.1, seed=0) == (train, val)
    assert len(D.split_files(files[:2], 0.01)[1]) == 1  # at least one held-out file
    with pytest.raises(ValueError):
        D.split_files(files, 1.5)


def test_plot_log(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "ar_loss": 5.0, "diff_loss": 9.0, "lr": 1e-3},
        {"step": 2, "ar_loss": 4.0, "diff_loss": None, "lr": 1e-3},
        {"step": 2, "val_ar_loss": 4.5, "val_diff_loss": 8.0}]) + "\n")
    assert len(read_log(log)) == 3
    assert plot_main([str(tmp_path / "missing.jsonl")]) == 2
    if importlib.util.find_spec("matplotlib") is None:
        assert plot_main([str(log)]) == 2 and "matplotlib" in capsys.readouterr().err
    else:
        assert plot_main([str(log), "--out", str(tmp_path / "c.png")]) == 0
        assert (tmp_path / "c.png").stat().st_size > 1000


def test_advice_training_prompts_are_new_and_never_held_out():
    """The second chat training set (`--prompts advice`) shares no prompt, and no topic, with the
    held-out chat prompts the benchmark's chat category measures, nor any prompt with the first set."""
    from trimode import prompts as P
    from trimode.train.distill import TRAIN_SOURCES, category_texts

    texts = P.advice_train_texts()
    assert "advice" in TRAIN_SOURCES and category_texts("advice", split="train") == texts
    assert len(texts) == len(set(texts)) == 500
    held = [h.lower() for h in P.CHAT_HELDOUT]
    assert not set(texts) & set(P.CHAT_HELDOUT) and not set(texts) & set(P.chat_train_texts())
    assert not [t for t in P.ADVICE_TOPICS + P.CREATIVE_TOPICS for h in held if t.lower() in h]


def test_stdlib_code_prompts_are_deterministic_and_train_only():
    from trimode.train.distill import category_texts, stdlib_code_texts

    texts = stdlib_code_texts()
    assert len(texts) > 200 and texts == stdlib_code_texts() and stdlib_code_texts(max_prompts=5) == texts[:5]
    names = [t.split("`")[1].split("(")[0] for t in texts]
    assert len(set(names)) == len(names) and all(not n.startswith("_") for n in names)
    assert all(t.startswith("Write a Python function `") and t.endswith(".") for t in texts)
    assert category_texts("stdlib-code", split="train") == texts and category_texts("stdlib-code", split="test") == []


def test_sampled_continuations_are_seeded_per_prompt_not_per_batch():
    """ar_continuations with sampling options: prompt i is drawn with seed + i, so the cache does not
    depend on the batch size; without them it is AR greedy."""
    from _tiny import PROMPTS, tiny_model

    from trimode import generate
    from trimode.train.distill import ar_continuations

    m = tiny_model(dlm_type="dream", eos=7, dtype=torch.float32)
    prompts = [list(p) for p in PROMPTS] * 2
    runs = [ar_continuations(m, prompts, new=12, eos_id=7, batch=b, log=lambda s: None, temperature=1.0, seed=3)
            for b in (1, 3)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].valid, runs[1].valid)
    greedy = ar_continuations(m, prompts, new=12, eos_id=7, batch=2, log=lambda s: None)
    ref = generate(m, prompts, mode="ar", max_new_tokens=12, eos_id=7)
    for i, g in enumerate(ref):
        P = len(prompts[i])
        assert greedy.tokens[i, P: P + len(g.tokens)].tolist() == g.tokens
    assert not torch.equal(runs[0].tokens, greedy.tokens)  # sampling at temperature 1 leaves greedy somewhere


def test_prompt_jsonl_round_trip(tmp_path):
    from trimode.train.distill import read_prompts_jsonl, write_prompts_jsonl

    texts = ["What is a prism?", 'Say "hi"\nin two lines.', "Ünïcode ✓"]
    write_prompts_jsonl(tmp_path / "p.jsonl", texts)
    assert read_prompts_jsonl(tmp_path / "p.jsonl") == texts
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Two plus two?"}) + "\n\n")
    assert read_prompts_jsonl(tmp_path / "q.jsonl") == ["Two plus two?"]
