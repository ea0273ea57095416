"""Build (or reload) the packed train/validation tensors and the tokenizer of a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import load_state
from . import data as D
from .config import TrainConfig


@dataclass
class Dataset:
    train_tokens: torch.Tensor  # (N, L) int64
    train_mask: torch.Tensor  # (N, L) bool, True = supervised
    val_tokens: torch.Tensor  # (M, L)
    val_mask: torch.Tensor
    tokenizer_dir: Path
    eos_id: int | None
    mask_id: int | None
    pad_id: int | None
    vocab_size: int
    info: dict


def _fingerprint(cfg: TrainConfig) -> str:
    keys = ("data", "exclude", "suffixes", "max_file_bytes", "text_field", "tokenizer", "init",
            "vocab_size", "seq_len", "val_fraction", "seed")
    d = {k: getattr(cfg, k) for k in keys}
    for k in ("prompt_field", "response_field", "val_data"):  # newer keys count only when set
        if getattr(cfg, k):
            d[k] = getattr(cfg, k)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_tok(directory: Path, what: str):
    """The tokenizer in `directory`, read the way checkpoints read it (`trimode.tokenizer.Tokenizer`:
    tokenizer.json and its side files), so a damaged file is refused here, never copied on."""
    from ..tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(directory).backend
    except ValueError as e:
        raise ValueError(f"{what} {str(directory)!r} is unusable: {e}") from None


def build_dataset(cfg: TrainConfig, *, log=print) -> Dataset:
    """Read, tokenize, split by whole files and pack the corpus; cache it in out_dir/data.pt."""
    out = Path(cfg.out_dir)
    cache_path = out / "data.pt"
    tok_dir = out / "tokenizer"
    fp = _fingerprint(cfg)
    if cache_path.exists() and (tok_dir / "tokenizer.json").exists():
        try:
            blob = load_state(cache_path, "the dataset cache")
        except ValueError as e:  # a cache is derived data: say why, and build it again
            log(f"{e}; rebuilding it")
            blob = {}
        if isinstance(blob, dict) and blob.get("fingerprint") == fp:
            return Dataset(tokenizer_dir=tok_dir, **blob["dataset"])
    files = D.resolve_files(cfg.data, suffixes=cfg.suffixes, exclude=cfg.exclude, max_file_bytes=cfg.max_file_bytes)
    if cfg.val_data:  # explicit held-out files instead of the hash split
        train_files = files
        val_files = D.resolve_files(cfg.val_data, suffixes=cfg.suffixes, exclude=cfg.exclude)
    else:
        train_files, val_files = D.split_files(files, cfg.val_fraction, seed=cfg.seed)
    def read(f: D.CorpusFile) -> list[D.Document]:
        return D.read_documents(f.path, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                                response_field=cfg.response_field)

    docs_train = [(f, read(f)) for f in train_files]
    docs_val = [(f, read(f)) for f in val_files]

    src_tok = Path(cfg.tokenizer) if cfg.tokenizer else (Path(cfg.init) if cfg.init else None)
    tok_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume and (tok_dir / "tokenizer.json").exists():  # never retrain the tokenizer of a run
        tok = _load_tok(tok_dir, "the run's tokenizer")
    elif src_tok is not None:
        tok = _load_tok(src_tok, "the tokenizer" if cfg.tokenizer else "the --init tokenizer")  # before copying
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src_tok / name).exists():
                shutil.copyfile(src_tok / name, tok_dir / name)
    else:
        log(f"training a {cfg.vocab_size}-token byte-level BPE on {len(train_files)} files")
        texts = (text for _, ds in docs_train for d in ds for text, _ in d)
        tok = D.train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size)
        D.save_tokenizer_dir(tok, tok_dir)
    eos_id = tok.token_to_id(D.EOS)
    mask_id = tok.token_to_id(D.MASK)
    pad_id = tok.token_to_id(D.PAD)
    if cfg.init:
        mc = json.loads((Path(cfg.init) / "config.json").read_text())
        eos_id = mc.get("eos_token_id", eos_id)
        mask_id = mc.get("mask_token_id", mask_id)
        pad_id = mc.get("pad_token_id", pad_id)

    def encode(items):
        return D.pack((D.encode_document(tok, d, eos_id=eos_id) for _, ds in items for d in ds), cfg.seq_len)

    tt, tm = encode(docs_train)
    vt, vm = encode(docs_val) if docs_val else (torch.zeros(0, cfg.seq_len, dtype=torch.long),) * 2
    vm = vm.bool()
    if tt.shape[0] < cfg.batch_size:
        raise ValueError(
            f"the training corpus packs into {tt.shape[0]} rows of {cfg.seq_len} tokens, fewer than one batch "
            f"({cfg.batch_size}); add data or lower batch_size / seq_len"
        )
    info = {
        "files_train": len(train_files), "files_val": len(val_files),
        "val_files": [f.key for f in val_files][:200],
        "tokens_train": int(tt.numel()), "tokens_val": int(vt.numel()),
    }
    ds = {"train_tokens": tt, "train_mask": tm, "val_tokens": vt, "val_mask": vm, "eos_id": eos_id, "mask_id": mask_id,
              "pad_id": pad_id, "vocab_size": tok.get_vocab_size(), "info": info}
    tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
    try:  # written aside and renamed: a full disk or a kill never leaves a half-written cache behind
        torch.save({"fingerprint": fp, "dataset": ds}, tmp)
        os.replace(tmp, cache_path)
    finally:
        tmp.unlink(missing_ok=True)
    (out / "data_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return Dataset(tokenizer_dir=tok_dir, **ds)
