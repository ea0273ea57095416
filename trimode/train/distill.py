"""Self-distillation data for `trimode train-drafter` and `train-sampler`: training prompts (benchmark
train splits, the project's chat set, text windows) and the model's own AR greedy continuations."""

from __future__ import annotations

import gzip
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# The bundled model's corpus filter (configs/bundled.toml [data]): prompts come from the same files.
STDLIB_EXCLUDE = ("*/test/*", "*/tests/*", "*/site-packages/*", "*/idlelib/*", "*/lib2to3/*", "*/encodings/*",
                  "*/__pycache__/*", "*/ensurepip/*", "*/config-3*/*", "*/pydoc_data/*")
CATEGORIES = ("gsm8k", "mbpp", "humaneval")
TRAIN_SOURCES = ("gsm8k", "mbpp", "chat", "advice", "stdlib-code")  # names accepted by --prompts (train splits)


# -- prompts ---------------------------------------------------------------------------------
def _heldout_keys(model_dir: Path) -> set[str]:
    f = model_dir / "heldout_files.json"
    return set(json.loads(f.read_text())["files"]) if f.exists() else set()


def stdlib_train_files(model_dir: Path) -> list[Path]:
    """The bundled model's training files: the stdlib .py corpus minus its held-out files."""
    from .data import resolve_files

    held = _heldout_keys(model_dir)
    files = resolve_files(["@stdlib"], suffixes=(".py",), exclude=STDLIB_EXCLUDE, max_file_bytes=200000)
    return [f.path for f in files if f.key not in held]


def stdlib_code_texts(*, max_prompts: int | None = None) -> list[str]:
    """Coding requests built from the running Python's standard library (every machine has one): for
    each public top-level function whose docstring opens with a short complete sentence, "Write a Python function
    `name(args)` that ...", in a fixed order (sorted files, source order), one per function name. The
    held-out coding sets (HumanEval, MBPP 11-510) are never read; the text is the library's docstring,
    the answer the model's own code. Python-version dependent (the card names the version used)."""
    import ast

    from .data import resolve_files

    files = resolve_files(["@stdlib"], suffixes=(".py",), exclude=STDLIB_EXCLUDE, max_file_bytes=200000)
    seen: set[str] = set()
    out: list[str] = []
    for f in files:
        try:
            tree = ast.parse(f.path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.name in seen:
                continue
            doc = ast.get_docstring(node)
            para = " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""  # the first paragraph
            if not (20 <= len(para) <= 160 and para.endswith(".") and para[0].isalpha()) or "``" in para:
                continue
            first = para.rstrip(".")
            args = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]
            seen.add(node.name)
            what = first[0].lower() + first[1:]
            out.append(f"Write a Python function `{node.name}({', '.join(args)})`. What it should do: {what}.")
            if max_prompts is not None and len(out) >= max_prompts:
                return out
    return out


def text_windows(tok, paths: Sequence[Path], *, n: int, prompt_len: int, seed: int,
                 min_left: int = 64) -> list[list[int]]:
    """n prompts of `prompt_len` tokens cut at random places (seeded) from random files."""
    rng = random.Random(seed)
    paths = list(paths)
    out: list[list[int]] = []
    cache: dict[Path, list[int]] = {}
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        p = rng.choice(paths)
        if p not in cache:
            cache[p] = tok.encode(p.read_text(encoding="utf-8", errors="replace"))
        ids = cache[p]
        if len(ids) < prompt_len + min_left:
            continue
        s = rng.randrange(0, len(ids) - prompt_len - min_left + 1)
        out.append(ids[s:s + prompt_len])
    if not out:
        raise ValueError("no file is long enough for a prompt")
    return out


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_prompts_jsonl(path: str | Path, texts: Sequence[str]) -> None:
    """Chat prompts as a jsonl of {"prompt": ...} lines (`--prompts FILE.jsonl`, `read_prompts_jsonl`)."""
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")


def read_prompts_jsonl(path: str | Path) -> list[str]:
    """The user messages of a prompts jsonl (key "question", "text" or "prompt", as `train_prompts`)."""
    rows = _jsonl(Path(path))
    if not rows:
        return []
    key = "question" if "question" in rows[0] else ("text" if "text" in rows[0] else "prompt")
    return [r[key] for r in rows]


def category_texts(category: str, *, split: str, root: Path | None = None) -> list[str]:
    """User messages of a benchmark category. split "train": GSM8K train, MBPP tasks 511-974 (the
    upstream validation and train splits); split "test": GSM8K test, MBPP tasks 11-510, HumanEval
    (test only). `chat` is the project's own general set (`trimode.prompts`: templates for train, a
    separately written set for test). root: the data directory (`trimode.prompts.data_root`)."""
    from ..prompts import CHAT_HELDOUT, advice_train_texts, chat_train_texts, data_root

    if category == "chat":
        return chat_train_texts() if split == "train" else list(CHAT_HELDOUT)
    if category == "advice":  # a second chat training set (trimode.prompts); its test split is chat's
        return advice_train_texts() if split == "train" else list(CHAT_HELDOUT)
    if category == "stdlib-code":  # coding requests from the Python standard library (train only)
        return stdlib_code_texts() if split == "train" else []
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES + ('chat',)}")
    root = data_root(root)
    if category == "gsm8k":
        rows = _jsonl(root / "gsm8k" / f"{'train' if split == 'train' else 'test'}.jsonl")
        return [r["question"] for r in rows]
    if category == "mbpp":
        rows = _jsonl(root / "mbpp" / "mbpp.jsonl")
        lo, hi = (511, 974) if split == "train" else (11, 510)
        return [f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}"
                for r in rows if lo <= r["task_id"] <= hi]
    if category == "humaneval":
        if split == "train":
            return []
        rows = _jsonl(root / "humaneval" / "HumanEval.jsonl.gz")
        return [f"Complete this Python function:\n```python\n{r['prompt']}```" for r in rows]
    raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES}")


def chat_prompts(tok, texts: Sequence[str], *, n: int, seed: int, max_len: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    texts = list(texts)
    rng.shuffle(texts)
    out = []
    for t in texts:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
        if len(ids) <= max_len:
            out.append(ids)
        if len(out) >= n:
            break
    return out


def train_prompts(model_dir: Path, tok, specs: Sequence[str] | None, *, n: int, prompt_len: int,
                  seed: int) -> list[list[int]]:
    """Training prompts: `specs` (names `gsm8k`, `mbpp`, `chat`: the train split of that category as chat
    prompts; jsonl files: chat prompts; text files / dirs: windows), else the stdlib training files
    for a model with heldout_files.json (the bundled one), else chat prompts from the GSM8K and MBPP
    train splits (`trimode.prompts.data_root`). Every source contributes up to n; the mix is shuffled."""
    if specs:
        named = [s for s in specs if s in TRAIN_SOURCES]
        chat = [s for s in specs if s not in named and (s.endswith(".jsonl") or s.endswith(".jsonl.gz"))]
        text = [s for s in specs if s not in chat and s not in named]
        out: list[list[int]] = []
        for s in named:
            out += chat_prompts(tok, category_texts(s, split="train"), n=n, seed=seed)
        for s in chat:
            out += chat_prompts(tok, read_prompts_jsonl(s), n=n, seed=seed)
        if text:
            from .data import resolve_files

            paths = [f.path for f in resolve_files(text)]
            out += text_windows(tok, paths, n=n, prompt_len=prompt_len, seed=seed)
        random.Random(seed).shuffle(out)
        return out[:n]
    if (model_dir / "heldout_files.json").exists():
        return text_windows(tok, stdlib_train_files(model_dir), n=n, prompt_len=prompt_len, seed=seed)
    half = (n + 1) // 2
    out = chat_prompts(tok, category_texts("gsm8k", split="train"), n=half, seed=seed)
    out += chat_prompts(tok, category_texts("mbpp", split="train"), n=n - len(out), seed=seed)
    return out


# -- self-distillation data ------------------------------------------------------------------
@dataclass
class Sequences:
    """Prompt + AR greedy continuation, right-padded: tokens (N, L), valid (N, L) marks targets."""

    tokens: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor


def ar_continuations(model, prompts: list[list[int]], *, new: int, eos_id: int | None, batch: int = 32,
                     pad_id: int = 0, log=print, **sampling: object) -> Sequences:
    """The model's own AR continuations (base weights), EOS kept as the last target: greedy, or sampled
    when `sampling` holds `generate` options (temperature, top_p, ..., seed: prompt i of the whole list
    gets seed + i, so the result does not depend on the batch size)."""
    from ..decode import generate

    seqs: list[list[int]] = []
    plens: list[int] = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        opts = dict(sampling)
        if opts.get("seed") is not None:
            opts["seed"] = int(opts["seed"]) + s  # type: ignore[call-overload]
        gens = generate(model, chunk, mode="ar", max_new_tokens=new, eos_id=eos_id, draft_adapter=None, **opts)
        for p, g in zip(chunk, gens):
            tail = [eos_id] if g.finish_reason == "stop" and eos_id is not None else []
            seqs.append(list(p) + g.tokens + tail)
            plens.append(len(p))
        log(f"  AR continuations {min(s + batch, len(prompts))}/{len(prompts)} "
            f"({time.perf_counter() - t0:.0f}s)")
    L = max(len(q) for q in seqs)
    tokens = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), L, dtype=torch.bool)
    for r, (q, P) in enumerate(zip(seqs, plens)):
        tokens[r, : len(q)] = torch.tensor(q)
        valid[r, P: len(q)] = True
    return Sequences(tokens, valid, torch.tensor([len(q) for q in seqs]), torch.tensor(plens))


def sample_anchors(seqs: Sequences, rows: Sequence[int], n: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """(len(rows), n) block starts in [P - 1, len - 2] (a block needs one target), sampled without
    replacement; rows with fewer candidates repeat some (their duplicate blocks are harmless)."""
    out = torch.empty(len(rows), n, dtype=torch.long)
    for j, r in enumerate(rows):
        lo, hi = int(seqs.prompt_lengths[r]) - 1, int(seqs.lengths[r]) - 2
        span = max(hi - lo + 1, 1)
        perm = torch.randperm(span, generator=gen)
        if span < n:
            perm = perm.repeat(math.ceil(n / span))
        out[j] = lo + perm[:n]
    return out
