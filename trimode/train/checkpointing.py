"""Atomic training checkpoints: the `latest` pointer and pruning around the one native writer.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding the native model as
`trimode.checkpoint.write_model` writes it (config.json + model.safetensors + the tokenizer files)
and `train_state.pt` (optimizer, scheduler, RNG, step), written in a temporary directory that
`_io.atomic_dir` renames into place; only then is the `latest` pointer (a one-line text file, itself
replaced atomically) moved to it. A failed write
(full disk, interrupted process) therefore never becomes the latest checkpoint.

Checkpoints are always full (unsharded): the weights of an FSDP2 run are gathered before writing and
the optimizer state is stored in `torch.optim.Optimizer.state_dict()` layout with whole tensors, so a
checkpoint resumes under DDP or FSDP2 and any world size, and loads with `trimode.load_model`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir, write_text_atomic
from ..checkpoint import write_model
from ..model import Transformer
from ..tokenizer import load_tokenizer

LATEST = "latest"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory the `latest` pointer names, or None when there is none."""
    root = checkpoint_root(out_dir)
    ptr = root / LATEST
    if not ptr.exists():
        return None
    name = ptr.read_text().strip()
    path = root / name
    if not (path / "train_state.pt").exists():
        raise ValueError(f"the latest pointer names {name!r}, which is incomplete or missing")
    return path


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: Transformer,
    train_state: dict[str, Any],
    *,
    tokenizer_dir: str | Path | None = None,
    keep: int = 2,
    model_state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, move `latest` to it and prune to the newest `keep`.

    `model_state_dict`: the full (unsharded) weights to write instead of `model.state_dict()`
    (FSDP2 runs gather them first). Any failure while writing (a full disk: OSError ENOSPC, or
    safetensors' own error wrapping it) is raised as `CheckpointError` with the cause; the temporary
    directory is removed and `latest` still names the previous complete checkpoint. An interrupt
    (Ctrl-C) during the write also removes the temporary directory and is re-raised.
    """
    root = checkpoint_root(out_dir)
    name = f"step_{step:08d}"
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
        # A step that already exists (a resumed run checkpointing it again) is replaced whole, or kept.
        with atomic_dir(final, marker="config.json") as tmp:
            write_model(model, tmp, tokenizer=tok, state=model_state_dict)
            torch.save(train_state, tmp / "train_state.pt")
        write_text_atomic(root / LATEST, name + "\n")
    except BaseException as e:
        if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: atomic_dir cleaned up; propagate
            raise
        raise CheckpointError(f"could not write checkpoint {final}: {e}{_free_space(root)}") from e
    # Temporary directories a killed writer left behind are never a checkpoint: remove them.
    for stale in [*root.glob(".step_*.tmp-*"), *root.glob(".step_*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    # Prune old complete checkpoints (never the one `latest` names).
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _free_space(path: Path) -> str:
    """' (N MB free on the disk)', for error messages (a full disk shows up as torch's 'unexpected pos')."""
    try:
        return f" ({shutil.disk_usage(path).free / 2**20:.1f} MB free on the disk)"
    except OSError:
        return ""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""
