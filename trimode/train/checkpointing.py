"""Atomic training checkpoints and the native model format.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding the native model (config.json +
model.safetensors), the tokenizer files and `train_state.pt` (optimizer, scheduler, RNG, step).
It is written under a temporary name and renamed into place with `os.replace`; only then is the
`latest` pointer (a one-line text file, itself replaced atomically) moved to it. A failed write
(full disk, interrupted process) therefore never becomes the latest checkpoint.

Checkpoints are always full (unsharded): the weights of an FSDP2 run are gathered before writing and
the optimizer state is stored in `torch.optim.Optimizer.state_dict()` layout with whole tensors, so a
checkpoint resumes under DDP or FSDP2 and any world size, and loads with `trimode.load_model`.
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


def model_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict (or the given full `state`, e.g. gathered from FSDP2 shards) without LoRA
    adapters, contiguous, on CPU."""
    src = model.state_dict() if state is None else state
    return {k: v.detach().contiguous().cpu() for k, v in src.items() if ".adapters." not in k}


def save_native(
    model: Transformer, directory: str | Path, *, tokenizer_dir: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """config.json + model.safetensors (+ tokenizer files copied from `tokenizer_dir`).

    `state`: the full (unsharded) state dict to write instead of `model.state_dict()`; a model
    sharded with FSDP2 passes the one gathered by `get_model_state_dict(full_state_dict=True)`.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = model_state(model, state)
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
    try:
        config = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid model config ({e})") from None
    model = Transformer(config)
    try:
        state = load_file(str(w_path))
    except Exception as e:  # SafetensorError (truncated / corrupted header), OSError
        raise ValueError(f"cannot read {w_path}: {e}") from None
    expected = {k: v for k, v in model.state_dict().items() if ".adapters." not in k}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {str(d)!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"checkpoint {str(d)!r} does not match its config: {k} has shape {got}, the config implies {want}"
            + (f" ({len(wrong)} tensors differ)" if len(wrong) > 1 else "")
        )
    model.load_state_dict(state, strict=False)
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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_tree(d: Path) -> None:
    """Flush every file of `d` and the directory entry itself to disk (before it is renamed)."""
    for p in d.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


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
    tmp = root / f".tmp-{name}-{os.getpid()}"
    aside = root / f".old-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        save_native(model, tmp, tokenizer_dir=tokenizer_dir, state=model_state_dict)
        torch.save(train_state, tmp / "train_state.pt")
        _fsync_tree(tmp)
        if final.exists():
            # Re-writing a step that already exists (a resumed run checkpointing the same step):
            # move the old copy aside, and back if the swap fails.
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(aside, final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: clean up, then propagate
            raise
        raise CheckpointError(f"could not write checkpoint {final}: {e}{_free_space(root)}") from e
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
