"""Token datasets from local files: reading, BPE training, packing and a held-out split.

A *document* is a list of (text, supervised) pieces. Plain text and `.jsonl` rows with a text field
are one supervised piece; chat `.jsonl` rows (`{"messages": [{"role", "content"}, ...]}`) are
rendered in ChatML, and only assistant turns are supervised: prompt tokens are neither noised nor
AR-supervised. Documents are tokenized, joined with EOS and packed into fixed-length rows.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

Document = list[tuple[str, bool]]

EOS, PAD, MASK, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|mask|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS, PAD, MASK, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".jsonl")
# A corpus spec that names the running interpreter's standard library (present on every machine).
STDLIB = "@stdlib"


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    key: str  # stable name used to assign the file to a split (path relative to its root)


def resolve_files(
    specs: Sequence[str],
    *,
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
    exclude: Sequence[str] = (),
    max_file_bytes: int | None = None,
) -> list[CorpusFile]:
    """Expand directories (recursively, by suffix), globs and files into a sorted list.

    The spec "@stdlib" means the running interpreter's standard library source directory.

    Files named explicitly must exist and be non-empty; files found by walking a directory or a
    glob are skipped when empty, too large or excluded. Raises ValueError when nothing is left.
    """
    if not specs:
        raise ValueError("no corpus paths given (data = [...])")
    out: dict[str, CorpusFile] = {}

    def excluded(p: Path) -> bool:
        s = p.as_posix()
        return any(fnmatch.fnmatch(s, pat) for pat in exclude)

    for spec in specs:
        if spec == STDLIB:
            import sysconfig

            spec = sysconfig.get_paths()["stdlib"]
        spec = os.path.expanduser(str(spec))
        p = Path(spec)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix in suffixes and not excluded(f):
                    size = f.stat().st_size
                    if size == 0 or (max_file_bytes is not None and size > max_file_bytes):
                        continue
                    out[str(f)] = CorpusFile(f, f.relative_to(p).as_posix())
        elif any(ch in spec for ch in "*?["):
            for s in sorted(glob.glob(spec, recursive=True)):
                f = Path(s)
                if f.is_file() and not excluded(f) and f.stat().st_size > 0:
                    out[str(f)] = CorpusFile(f, f.as_posix())
        elif p.is_file():
            if p.stat().st_size == 0:
                raise ValueError(f"corpus file {spec!r} is empty")
            out[str(p)] = CorpusFile(p, p.name)
        else:
            raise ValueError(f"corpus path {spec!r} does not exist")
    if not out:
        raise ValueError(f"no corpus files found under {list(specs)} (suffixes {list(suffixes)})")
    return [out[k] for k in sorted(out)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read corpus file {str(path)!r}: {e}") from None


def chat_pieces(messages: list[dict]) -> Document:
    """ChatML pieces of a conversation; assistant contents (with their end tag) are supervised."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    pieces: Document = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}"[:200])
        sup = m["role"] == "assistant"
        pieces.append((f"{IM_START}{m['role']}\n", False))
        pieces.append((f"{m['content']}{IM_END}", sup))
        pieces.append(("\n", False))
    return pieces


def read_documents(
    path: Path, *, text_field: str = "text", prompt_field: str | None = None, response_field: str | None = None
) -> list[Document]:
    """The documents of one file (a `.jsonl` gives one per non-empty line).

    A `.jsonl` row is a chat (`messages`), a prompt/response pair (`prompt_field` and
    `response_field` both set, e.g. GSM8K's question/answer: a user turn and an assistant turn) or
    plain text (`text_field`).
    """
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"corpus file {str(path)!r} is empty")
    if path.suffix != ".jsonl":
        return [[(text, True)]]
    docs: list[Document] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            docs.append(chat_pieces(row["messages"]))
        elif prompt_field and response_field and isinstance(row, dict) and prompt_field in row:
            if not isinstance(row.get(response_field), str):
                raise ValueError(f"{path}:{n}: row lacks a string {response_field!r} field")
            docs.append(chat_pieces([{"role": "user", "content": str(row[prompt_field])},
                                     {"role": "assistant", "content": row[response_field]}]))
        elif isinstance(row, dict) and isinstance(row.get(text_field), str):
            docs.append([(row[text_field], True)])
        else:
            raise ValueError(f"{path}:{n}: row has neither 'messages' nor a string {text_field!r} field")
    if not docs:
        raise ValueError(f"corpus file {str(path)!r} has no rows")
    return docs


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (`tokenizers`) with EOS, PAD, MASK and ChatML specials at ids 0..4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer_dir(tok, directory: str | Path, *, chat_template: str = CHATML_TEMPLATE) -> None:
    """Write tokenizer.json and an HF-style tokenizer_config.json (special tokens + chat template)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "mask_token": MASK,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": chat_template,
        "model_max_length": 1024,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def encode_document(tok, doc: Document, *, eos_id: int | None) -> tuple[list[int], list[bool]]:
    """Token ids and per-token supervision of one document, EOS appended (supervised)."""
    ids: list[int] = []
    sup: list[bool] = []
    for text, s in doc:
        piece = tok.encode(text, add_special_tokens=False).ids
        ids.extend(piece)
        sup.extend([s] * len(piece))
    if eos_id is not None:
        ids.append(eos_id)
        sup.append(True)
    return ids, sup


def pack(
    encoded: Iterable[tuple[list[int], list[bool]]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents and cut into rows of `seq_len`; the partial tail is dropped.

    Returns tokens (N, seq_len) int64 and loss_mask (N, seq_len) bool.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids: list[int] = []
    sup: list[bool] = []
    for i, s in encoded:
        ids.extend(i)
        sup.extend(s)
    n = len(ids) // seq_len
    t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    m = torch.tensor(sup[: n * seq_len], dtype=torch.bool).view(n, seq_len)
    return t, m


def is_validation(key: str, val_fraction: float, seed: int) -> bool:
    """Whole-file split: a file is held out when the hash of its key falls below val_fraction."""
    h = hashlib.blake2b(f"split:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def split_files(
    files: Sequence[CorpusFile], val_fraction: float, *, seed: int = 0
) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """(train, validation) by whole files; at least one validation file when val_fraction > 0 and
    there are two or more files."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    val = [f for f in files if is_validation(f.key, val_fraction, seed)]
    if val_fraction > 0 and not val and len(files) > 1:
        val = [min(files, key=lambda f: hashlib.blake2b(f"split:{seed}:{f.key}".encode()).digest())]
    train = [f for f in files if f not in val]
    if not train:
        train, val = list(files), []
    return train, val
