"""Draft vocabularies: the token ids a model's draft passes score (`Transformer.set_draft_vocab`).

On a memory-bound forward the output head is a large share of the bytes a draft pass reads
(SmolLM2-135M: 49152 x 576 of ~135M weights). The tokens a model actually writes are far fewer:
ranked by how often the model's own greedy continuations of training prompts use them, the top few
thousand cover nearly all of them. A draft pass restricted to those rows proposes the same tokens
almost always and costs less; verify passes keep the whole vocabulary, so greedy output is exactly
AR's and sampling stays lossless (docs/speculation.md, "A draft vocabulary").

The file is `draft_vocab.json` in the draft adapter's directory (it belongs to the drafter):
`{"format": 1, "vocab_size": V, "ids": [...], ...}` plus free-form provenance (source, coverage).
`trimode.peft.load_adapter` reads it; `trimode train-drafter --draft-vocab N` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FILE = "draft_vocab.json"
FORMAT = 1


def from_counts(counts: torch.Tensor, size: int, *, keep=(), drop=()) -> torch.Tensor:
    """The `size` highest-scoring ids of `counts` (V,) (counts or frequencies; ties: lower id first)
    that occur at all, plus the ids in `keep` (EOS and other tokens that must stay draftable), minus
    those in `drop` (the mask token, which is never a prediction). Sorted."""
    if size < 1:
        raise ValueError(f"a draft vocabulary needs size >= 1, got {size}")
    counts = torch.as_tensor(counts).double().clone()
    V = counts.numel()
    for i in drop:
        if i is not None and 0 <= int(i) < V:
            counts[int(i)] = -1
    order = torch.argsort(-counts, stable=True)  # score desc; stable: ties keep the lower id first
    top = order[: min(size, int((counts > 0).sum()))]
    extra = [int(i) for i in keep if i is not None and 0 <= int(i) < V and int(i) not in set(drop)]
    ids = torch.unique(torch.cat([top, torch.tensor(extra, dtype=torch.long)]))
    if ids.numel() == 0:
        raise ValueError("no token was counted: a draft vocabulary needs some generated text")
    return ids


def frequencies(tokens) -> torch.Tensor:
    """Relative frequencies (V,) of a tensor of ids, or of a counts vector already."""
    t = torch.as_tensor(tokens)
    return t.double() / max(float(t.sum()), 1.0)


def corpus_counts(tok, vocab_size: int, *, data=None, stdlib: bool = True, log=None) -> dict[str, torch.Tensor]:
    """Token counts (V,) of text a tokenizer's model is likely to write, by source, none of it held out:
    "data": the GSM8K train split (questions and answers), MBPP tasks 511-974 (text and code) and the
    project's template-built chat prompts (`trimode.prompts.chat_train_texts`), where the data
    directory (`trimode.prompts.data_root`) exists; "stdlib": the Python standard library's top-level
    modules and its documentation topics (every machine with Python has them)."""
    import json
    import sysconfig

    from .prompts import chat_train_texts, data_root

    def count(texts) -> torch.Tensor:
        c = torch.zeros(vocab_size, dtype=torch.float64)
        for t in texts:
            ids = tok.encode(t)
            if ids:
                c += torch.bincount(torch.tensor(ids), minlength=vocab_size)[:vocab_size].double()
        return c

    out: dict[str, torch.Tensor] = {}
    texts = list(chat_train_texts())
    root = data_root(data, required=False)
    if root is not None:
        for line in (root / "gsm8k" / "train.jsonl").read_text().splitlines():
            r = json.loads(line)
            texts += [r["question"], r["answer"]]
        for line in (root / "mbpp" / "mbpp.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["task_id"] > 510:  # 11-510 are the held-out test tasks
                texts += [r["text"], r["code"]]
    elif log:
        log("draft vocabulary: no data directory (--data / $TRIMODE_DATA): counting the chat prompts and stdlib only")
    out["data"] = count(texts)
    if stdlib:
        lib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(lib.glob("*.py")) + [lib / "pydoc_data" / "topics.py"]
        out["stdlib"] = count(f.read_text(errors="ignore") for f in files if f.is_file())
    return out


def mixture(*counts: torch.Tensor) -> torch.Tensor:
    """Equal-weight mixture of the sources' relative frequencies (each source counts once, whatever its
    size): the self-distilled targets rank what the model writes; the corpora fill the long tail."""
    return sum(frequencies(c) for c in counts)


def coverage(ids: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> float:
    """Share of `tokens` (any shape) whose id is in `ids`."""
    inside = torch.zeros(vocab_size, dtype=torch.bool)
    inside[ids] = True
    t = tokens.reshape(-1)
    return float(inside[t].float().mean()) if t.numel() else 0.0


def write(directory: str | Path, ids: torch.Tensor, *, vocab_size: int, **meta: Any) -> Path:
    path = Path(directory) / FILE
    body = {"format": FORMAT, "vocab_size": int(vocab_size), "size": int(ids.numel()), **meta,
            "ids": [int(i) for i in ids.tolist()]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body) + "\n")
    tmp.replace(path)
    return path


def read(directory: str | Path, vocab_size: int) -> torch.Tensor | None:
    """The ids in `directory`/draft_vocab.json (None without the file), validated against the model's
    vocabulary: a file for another vocabulary is an error, never a silently different draft."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to draft over the whole vocabulary") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"{path}: not a draft vocabulary of format {FORMAT}")
    if body.get("vocab_size") != vocab_size:
        raise ValueError(f"{path} was made for a vocabulary of {body.get('vocab_size')} tokens, the model has "
                         f"{vocab_size}: it belongs to another model")
    ids = body.get("ids")
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids)):
        raise ValueError(f"{path}: 'ids' must be a non-empty list of token ids in [0, {vocab_size})")
    return torch.tensor(ids, dtype=torch.long)
