"""File plumbing shared by checkpoint and adapter I/O: JSON, safetensors headers, atomic directories.

Every read failure becomes a `ValueError` naming the file, because a truncated download or a wrong
path is a user-caused error, not a bug. Every write goes through `atomic_dir`, so an interrupted save
never leaves a half-written checkpoint where a good one (or nothing) used to be.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    except RecursionError:  # a pathologically nested file
        raise ValueError(f"cannot read {path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")  # noqa: TRY004 (bad file)
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_state(path: Path, what: str) -> Any:
    """torch.load(path) of tensors, numbers, strings and containers only (weights_only: a file can
    never run code); anything else, or a damaged file, is a ValueError naming `what` and the file."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError (a foreign object in the pickle), a truncated file, ...
        raise ValueError(f"refusing {what} {path}: it is not a plain tensor file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}); trimode never unpickles "
                         "code from files") from None


def check_writable_dir(path: str | Path, what: str) -> None:
    """Raise ValueError naming `path` unless this process can create (or write into) the directory
    `path`: it must be a directory or not exist yet, and the nearest existing ancestor must accept a
    new file (probed with a real file, so read-only mounts count too; the probe is removed at once).
    Nothing is created: commands call this before any expensive work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot use {path} as the {what}: it exists and is not a directory")
    base = path
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"cannot create the {what} {path}: {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".trimode-write-probe-", dir=base)
    except OSError as e:
        where = "" if base == path else f" ({base.resolve()} is not writable)"
        raise ValueError(f"cannot write to the {what} {path}{where}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def os_error_message(e: OSError) -> str:
    """One line for an OSError from a read or a write: 'FILE: reason' (the file when the error names it)."""
    files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{files}: {reason}" if files else reason


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file `path` by `text` in one rename (a reader sees the old or the new text, whole)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives and what its header says, read before any data is loaded."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: "F32", "BF16", ...


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Names, shapes and dtypes in one safetensors file. Truncated or corrupt files raise ValueError."""
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                sl = f.get_slice(name)
                out[name] = TensorEntry(path, tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def load_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `names` from one file, one tensor at a time, so peak memory stays one tensor above the model."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read tensor data (truncated or corrupted?): {e}") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Contiguous CPU copies, so views, GPU tensors and tied storages all serialise."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata={"format": "pt"})
    os.chmod(path, default_mode())  # safetensors creates its file 0600


def _umask() -> int:
    """The process umask, read without changing it where the OS can (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode open() / mkdir() would give a new file (0666) or directory (0777) under the umask (typically
    0644 / 0755): for files written through mkstemp / mkdtemp or by libraries that create them 0600."""
    return (0o777 if directory else 0o666) & ~_umask()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; best effort
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, marker: str) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path` in one rename.

    `marker` is the file that makes an existing directory ours to replace (config.json for a
    checkpoint): a non-empty directory without it is refused rather than deleted.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise ValueError(f"refusing to overwrite {path}: it is a non-empty directory without {marker}")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it 0700
        if path.exists():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
