"""Prompt suites by category, built from the benchmark data, the project's chat set and the model's own
held-out text.

Categories (SPEED-Bench style, per-category numbers are reported separately):

- `coding`: HumanEval `prompt` and MBPP `text` + its first `test_list` assert (evaluation split,
  task_id 11-510), alternating;
- `math`: GSM8K test `question`;
- `chat`: the project's held-out general chat requests (`trimode.prompts.CHAT_HELDOUT`, 32 prompts);
- `domain`: held-out text from the model's own training domain, cut into fixed-length windows. For
  a checkpoint with `heldout_files.json` (the bundled model: standard-library files it never saw)
  those files; otherwise files passed with `--domain-files`; otherwise no domain category.

Where the data comes from: `data` (`--data DIR`, must exist), else $TRIMODE_DATA (must exist), else
`shared/data` beside the checkout when present (`trimode.prompts.data_root`), else the excerpt packaged
in `trimode/assets/prompts/` (all HumanEval prompts, the MBPP evaluation split, the first 200 GSM8K test
questions; see its README.md). The excerpt gives exactly the prompts of the full files, in the same order;
a math suite of more than 200 prompts needs the full data.

Prompts are chat-formatted (one user turn, generation prompt) when `chat` is true; the domain
category is always raw continuation text, and raw chat prompts read "User: ...\nAssistant:". Raw prompts
end without a trailing newline: byte-level BPEs merge a newline with the indentation after it, so a prompt
ending in a bare newline is off distribution. Prompts longer than `max_prompt_len` tokens keep their last
tokens.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("coding", "math", "chat", "domain")
MBPP_EVAL = range(11, 511)  # the upstream evaluation split
# The packaged excerpt (scripts/make_prompt_assets.py writes it from a data directory).
PACKAGED = Path(__file__).resolve().parents[1] / "assets" / "prompts"
PACKAGED_HUMANEVAL = PACKAGED / "humaneval" / "HumanEval_prompts.jsonl.gz"
PACKAGED_MBPP = PACKAGED / "mbpp" / "mbpp_eval_prompts.jsonl.gz"
PACKAGED_GSM8K = PACKAGED / "gsm8k" / "test_questions.jsonl.gz"
PACKAGED_GSM8K_N = 200


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: where it came from, its text (after formatting) and its token ids."""

    category: str
    source: str  # e.g. "HumanEval/0", "mbpp/11", "gsm8k/0", "chat/0", "heldout/ntpath.py@0"
    text: str
    tokens: tuple[int, ...]


def default_categories(chat: bool) -> list[str]:
    """The categories a benchmark of a model measures by default: `chat` only for chat-formatted prompts
    (a raw "User: ... Assistant:" turn is off distribution for a base model); `domain` is left out later
    when the model has no held-out text."""
    return [c for c in CATEGORIES if chat or c != "chat"]


def data_dir(path: str | Path | None = None) -> Path | None:
    """The full benchmark data directory, or None for the packaged excerpt. `path` (`--data`) and
    $TRIMODE_DATA must exist (a clear ValueError otherwise); the default `shared/data` beside the checkout
    is used only when present."""
    from ..prompts import data_root

    if path is not None or os.environ.get("TRIMODE_DATA"):
        return data_root(path)
    return data_root(required=False)


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _humaneval(data: Path | None) -> list[dict]:
    return _jsonl(data / "humaneval" / "HumanEval.jsonl.gz" if data is not None else PACKAGED_HUMANEVAL)


def _mbpp_eval(data: Path | None) -> list[dict]:
    rows = _jsonl(data / "mbpp" / "mbpp.jsonl" if data is not None else PACKAGED_MBPP)
    return [r for r in rows if r["task_id"] in MBPP_EVAL]


def _gsm8k_test(data: Path | None, n: int) -> list[dict]:
    if data is not None:
        return _jsonl(data / "gsm8k" / "test.jsonl")[:n]
    if n > PACKAGED_GSM8K_N:
        raise ValueError(f"{n} math prompts asked for, but without a data directory only the packaged first "
                         f"{PACKAGED_GSM8K_N} GSM8K test questions are available: ask for at most "
                         f"{PACKAGED_GSM8K_N}, or pass --data DIR or set TRIMODE_DATA to a directory holding "
                         "gsm8k/test.jsonl")
    return _jsonl(PACKAGED_GSM8K)[:n]


def coding_texts(data: Path | None, n: int, *, chat: bool) -> list[tuple[str, str]]:
    """n (source, text) pairs alternating HumanEval and MBPP (data None: the packaged excerpt)."""
    he = _humaneval(data)
    mb = _mbpp_eval(data)
    out: list[tuple[str, str]] = []
    for i in range(n):
        if i % 2 == 0:
            r = he[(i // 2) % len(he)]
            body = r["prompt"]
            text = (f"Complete the following Python function.\n```python\n{body}```" if chat else body.rstrip())
            out.append((r["task_id"], text))
        else:
            r = mb[(i // 2) % len(mb)]
            test = r["test_list"][0]
            text = (f"{r['text']} Your code should pass this test:\n{test}" if chat
                    else f'"""{r["text"]}\n{test}\n"""')
            out.append((f"mbpp/{r['task_id']}", text))
    return out


def math_texts(data: Path | None, n: int, *, chat: bool) -> list[tuple[str, str]]:
    """Up to n GSM8K test questions (data None: the packaged first 200; more is a ValueError)."""
    rows = _gsm8k_test(data, n)
    return [(f"gsm8k/{i}", r["question"] if chat else f"Question: {r['question']}\nAnswer:")
            for i, r in enumerate(rows)]


def chat_texts(n: int, *, chat: bool) -> list[tuple[str, str]]:
    """Up to n of the project's held-out chat requests (no data directory needed)."""
    from ..prompts import CHAT_HELDOUT

    return [(f"chat/{i}", t if chat else f"User: {t}\nAssistant:") for i, t in enumerate(CHAT_HELDOUT[:n])]


def heldout_files(model_dir: Path | None) -> list[Path]:
    """The held-out files listed in `heldout_files.json` of the model directory (stdlib-relative)."""
    if model_dir is None or not (model_dir / "heldout_files.json").is_file():
        return []
    spec = json.loads((model_dir / "heldout_files.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / f for f in spec["files"] if (root / f).is_file()]


def domain_prompts(tok, files: Sequence[Path], n: int, *, prompt_len: int, new_tokens: int) -> list[Prompt]:
    """n windows of prompt_len tokens, spread evenly over the files (each window leaves room for the
    continuation in the file, so the model is asked to continue real held-out text)."""
    windows: list[tuple[str, list[int]]] = []
    for f in files:
        ids = tok.encode(f.read_text(encoding="utf-8"))
        for start in range(0, max(0, len(ids) - prompt_len - new_tokens), 512):
            windows.append((f"heldout/{f.name}@{start}", ids[start:start + prompt_len]))
    if not windows:
        return []
    # Round-robin over files so few prompts still cover several files.
    by_file: dict[str, list[tuple[str, list[int]]]] = {}
    for src, ids in windows:
        by_file.setdefault(src.split("@")[0], []).append((src, ids))
    order: list[tuple[str, list[int]]] = []
    lists = list(by_file.values())
    for i in range(max(len(v) for v in lists)):
        order.extend(v[i] for v in lists if i < len(v))
    return [Prompt("domain", src, tok.decode(ids), tuple(ids)) for src, ids in order[:n]]


def build_suites(
    tok,
    *,
    n: int,
    categories: Sequence[str] | None = None,
    chat: bool = False,
    model_dir: Path | None = None,
    domain_files: Sequence[Path] = (),
    data: Path | None = None,
    max_prompt_len: int = 256,
    domain_prompt_len: int = 96,
    new_tokens: int = 64,
) -> dict[str, list[Prompt]]:
    """Up to n prompts per category (categories with no source are left out). data: the benchmark data
    directory (must exist); None: $TRIMODE_DATA, else shared/data beside the checkout, else the packaged
    excerpt (see the module docstring). categories None: `default_categories(chat)`."""
    if categories is None:
        categories = default_categories(chat)
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; choose from {', '.join(CATEGORIES)}")
    if n < 1:
        raise ValueError(f"the number of prompts per category must be >= 1, got {n}")
    if chat and tok.chat_template is None:
        raise ValueError("chat formatting asked for, but the tokenizer has no chat template")
    out: dict[str, list[Prompt]] = {}
    d = data_dir(data) if {"coding", "math"} & set(categories) else None  # None also: the packaged excerpt
    for cat in categories:
        if cat == "domain":
            files = list(domain_files) or heldout_files(model_dir)
            ps = domain_prompts(tok, files, n, prompt_len=domain_prompt_len, new_tokens=new_tokens)
            if ps:
                out[cat] = ps
            continue
        if cat == "chat":
            texts = chat_texts(n, chat=chat)
        else:
            texts = coding_texts(d, n, chat=chat) if cat == "coding" else math_texts(d, n, chat=chat)
        prompts = []
        for src, text in texts:
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            ids = tok.encode(text)[-max_prompt_len:]
            prompts.append(Prompt(cat, src, text, tuple(ids)))
        out[cat] = prompts
    return out


def synthetic_suites(vocab: int, *, n: int, prompt_len: int = 12, avoid: Sequence[int] = ()) -> dict[str, list[Prompt]]:
    """Deterministic token-id prompts for models without a tokenizer (tests, random models)."""
    out: dict[str, list[Prompt]] = {}
    skip = set(avoid)
    ok = [t for t in range(vocab) if t not in skip]
    for c, cat in enumerate(("coding", "math")):
        ps = []
        for i in range(n):
            ids = tuple(ok[(7 * i + 13 * j + 31 * c + 3) % len(ok)] for j in range(prompt_len - (i % 3)))
            ps.append(Prompt(cat, f"synthetic/{cat}/{i}", "", ids))
        out[cat] = ps
    return out
