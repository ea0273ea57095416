"""Atomic training checkpoints and the native model format.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding the native model (config.json +
model.safetensors), the tokenizer files and `train_state.pt` (optimizer, scheduler, RNG, step).
It is written under a temporary name and renamed into place with `os.replace`; only then is the
`latest` pointer (a one-line text file, itself replaced atomically) moved to it. A failed write
(full disk, interrupted process) therefore never becomes the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..model import Transformer

LATEST = "latest"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without LoRA adapters, contiguous, on CPU."""
    return {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if ".adapters." not in k
    }


def save_native(model: Transformer, directory: str | Path, *, tokenizer_dir: str | Path | None = None) -> None:
    """config.json + model.safetensors (+ tokenizer files copied from `tokenizer_dir`)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = model_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copyfile(src, d / name)


def load_native(directory: str | Path, *, dtype: torch.dtype | None = None) -> Transformer:
    """A native checkpoint directory as a Transformer (CPU). ValueError for other formats."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / "config.json", d / "model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise ValueError(f"{str(d)!r} is not a trimode checkpoint (needs config.json and model.safetensors)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {cfg_path}: {e}") from None
    if raw.get("model_type") != "trimode":
        raise ValueError(
            f"{str(d)!r} holds model_type {raw.get('model_type')!r}, not a trimode checkpoint; "
            "convert it first (trimode convert)"
        )
    config = ModelConfig.from_dict(raw)
    model = Transformer(config)
    state = load_file(str(w_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".adapters." not in k]
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {str(d)!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if dtype is not None:
        model = model.to(dtype)
    return model


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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: Transformer,
    train_state: dict[str, Any],
    *,
    tokenizer_dir: str | Path | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, move `latest` to it and prune to the newest `keep`.

    Raises OSError subclasses as ValueError-free `CheckpointError` with the cause; the temporary
    directory is removed and `latest` still names the previous complete checkpoint.
    """
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_native(model, tmp, tokenizer_dir=tokenizer_dir)
        torch.save(train_state, tmp / "train_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e}") from e
    # Prune old complete checkpoints (never the one `latest` names).
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""
