"""Benchmark suites without the developers' data directory: the packaged excerpt, the chat category, and
`@data/` corpus paths in training configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import trimode.prompts as P
from trimode.bench import suites as S
from trimode.bench.suites import CATEGORIES, build_suites, default_categories
from trimode.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "trimode" / "assets" / "bundled"
FULL = P.data_root(required=False)  # the full GSM8K / MBPP / HumanEval files, where present
needs_full = pytest.mark.skipif(
    FULL is None, reason="the full benchmark data ($TRIMODE_DATA or shared/data beside the checkout) is absent")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUNDLED)


def _no_data(monkeypatch, tmp_path) -> list[Path]:
    """No $TRIMODE_DATA and a default data directory that does not exist, as in a fresh clone; returns the
    list of files the suites read from then on."""
    monkeypatch.delenv("TRIMODE_DATA", raising=False)
    real = P.data_root

    def data_root(path=None, *, required=True):
        return real(path if path is not None else tmp_path / "no-shared-data", required=required)

    monkeypatch.setattr(P, "data_root", data_root)
    read: list[Path] = []
    real_jsonl = S._jsonl

    def jsonl(path):
        read.append(Path(path))
        return real_jsonl(path)

    monkeypatch.setattr(S, "_jsonl", jsonl)
    assert S.data_dir() is None
    return read


@pytest.fixture
def fresh_clone(monkeypatch, tmp_path) -> list[Path]:
    return _no_data(monkeypatch, tmp_path)


def test_packaged_files_small_and_licensed() -> None:
    files = [f for f in S.PACKAGED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 200_000
    for f in ("README.md", "humaneval/LICENSE", "mbpp/LICENSE.md", "mbpp/README.md", "gsm8k/LICENSE"):
        assert (S.PACKAGED / f).is_file(), f
    assert len(S._humaneval(None)) == 164
    assert [r["task_id"] for r in S._mbpp_eval(None)] == list(S.MBPP_EVAL)
    assert len(S._gsm8k_test(None, S.PACKAGED_GSM8K_N)) == S.PACKAGED_GSM8K_N


def test_fresh_clone_builds_from_the_packaged_excerpt(tok, fresh_clone) -> None:
    out = build_suites(tok, n=3, categories=["coding", "math", "chat"])
    assert [p.source for p in out["coding"]] == ["HumanEval/0", "mbpp/11", "HumanEval/1"]
    assert [p.source for p in out["math"]] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert out["math"][0].text.startswith("Question: Janet")
    assert [p.source for p in out["chat"]] == ["chat/0", "chat/1", "chat/2"]
    assert fresh_clone and all(f.is_relative_to(S.PACKAGED) for f in fresh_clone)
    # coding cycles over the whole excerpt; math stops at the packaged 200 with a clear error
    assert len(build_suites(tok, n=201, categories=["coding"])["coding"]) == 201
    assert len(build_suites(tok, n=200, categories=["math"])["math"]) == 200
    with pytest.raises(ValueError, match=r"first 200 GSM8K.*--data DIR or set TRIMODE_DATA"):
        build_suites(tok, n=201, categories=["math"])


@needs_full
@pytest.mark.parametrize("n", [16, 100])
@pytest.mark.parametrize("chat", [False, True])
def test_packaged_excerpt_equals_full_data(tok, monkeypatch, tmp_path, n: int, chat: bool) -> None:
    full = build_suites(tok, n=n, categories=["coding", "math"], chat=chat, data=FULL)
    _no_data(monkeypatch, tmp_path)
    packaged = build_suites(tok, n=n, categories=["coding", "math"], chat=chat)
    assert packaged == full
    assert [len(v) for v in packaged.values()] == [n, n]


@needs_full
def test_packaged_texts_equal_full_data_beyond_one_cycle() -> None:
    for chat in (False, True):
        assert S.coding_texts(None, 1100, chat=chat) == S.coding_texts(FULL, 1100, chat=chat)
        assert S.math_texts(None, 200, chat=chat) == S.math_texts(FULL, 200, chat=chat)


@needs_full
def test_make_prompt_assets_reproduces_the_package(tmp_path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_prompt_assets.py"), "--data", str(FULL),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    made = sorted(f.relative_to(tmp_path) for f in tmp_path.rglob("*") if f.is_file())
    assert made == sorted(f.relative_to(S.PACKAGED) for f in S.PACKAGED.rglob("*") if f.is_file())
    for f in made:
        assert (tmp_path / f).read_bytes() == (S.PACKAGED / f).read_bytes(), f


def test_missing_data_directory_named_explicitly_is_an_error(tok, tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="given data directory.*--data DIR or set TRIMODE_DATA"):
        build_suites(tok, n=2, categories=["coding"], data=tmp_path / "nope")
    monkeypatch.setenv("TRIMODE_DATA", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"\$TRIMODE_DATA"):
        build_suites(tok, n=2, categories=["math"])


def test_chat_category(tok, monkeypatch) -> None:
    def no_data(*a, **k):
        raise AssertionError("the chat category needs no data directory")

    monkeypatch.setattr(S, "data_dir", no_data)
    assert "chat" in CATEGORIES
    chat = build_suites(tok, n=100, categories=["chat"], chat=True)["chat"]
    assert len(chat) == len(P.CHAT_HELDOUT) and chat[5].source == "chat/5"
    assert chat[0].text.startswith("<|im_start|>user") and P.CHAT_HELDOUT[0] in chat[0].text
    raw = build_suites(tok, n=2, categories=["chat"])["chat"]
    assert raw[1].text == f"User: {P.CHAT_HELDOUT[1]}\nAssistant:"


def test_default_categories(tok, fresh_clone) -> None:
    assert default_categories(True) == ["coding", "math", "chat", "domain"]
    assert default_categories(False) == ["coding", "math", "domain"]
    assert list(build_suites(tok, n=1, chat=True)) == ["coding", "math", "chat"]  # no held-out domain text here
    assert list(build_suites(tok, n=1, model_dir=BUNDLED)) in (["coding", "math", "domain"], ["coding", "math"])


# -- training configs: "@data/REL" corpus paths ------------------------------------------------------
def test_config_data_paths_resolve_against_the_data_root(tmp_path, monkeypatch) -> None:
    from trimode.train.config import build_config

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    monkeypatch.setenv("TRIMODE_DATA", str(tmp_path))
    cfg = build_config(None, {"data": "@data/gsm8k/train.jsonl,plain/path"})
    assert cfg.data == (str(tmp_path / "gsm8k" / "train.jsonl"), "plain/path")
    with pytest.raises(ValueError, match=r"val_data path '@data/gsm8k/test.jsonl'.*set TRIMODE_DATA"):
        build_config(None, {"val_data": "@data/gsm8k/test.jsonl"})
    monkeypatch.setenv("TRIMODE_DATA", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"TRIMODE_DATA=.*nope does not exist; set TRIMODE_DATA"):
        build_config(ROOT / "configs" / "smollm2_joint.toml", {})


@needs_full
def test_smollm2_joint_config_finds_gsm8k(monkeypatch) -> None:
    from trimode.train.config import build_config

    monkeypatch.setenv("TRIMODE_DATA", str(FULL))
    cfg = build_config(ROOT / "configs" / "smollm2_joint.toml", {})
    assert cfg.data == (str(FULL / "gsm8k" / "train.jsonl"),)
    assert cfg.val_data == (str(FULL / "gsm8k" / "test.jsonl"),)
