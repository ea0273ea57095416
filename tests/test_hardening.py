"""Files a user could hand us never run code: every state file is read with weights_only, and a
crafted pickle is refused (or, for a derived cache, rebuilt) with a clear message, its payload unrun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_loop import tiny_cfg

from trimode._io import load_state
from trimode.train import checkpointing as C
from trimode.train.loop import train


class Payload:
    """Unpickling this creates the marker file: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted(path: Path, marker: Path, **extra) -> Path:
    torch.save({"step": 1, "payload": Payload(marker), **extra}, path)
    assert not marker.exists()
    return path


def test_load_state_refuses_a_pickle_with_code(tmp_path):
    marker = tmp_path / "ran"
    f = crafted(tmp_path / "state.pt", marker)
    with pytest.raises(ValueError, match="refusing the trainer state .*never unpickles code"):
        load_state(f, "the trainer state")
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(f.read_bytes()[:50])  # a truncated file: the same clear error
    with pytest.raises(ValueError, match="refusing"):
        load_state(tmp_path / "cut.pt", "the trainer state")
    torch.save({"step": 3, "t": torch.ones(2)}, tmp_path / "plain.pt")
    assert load_state(tmp_path / "plain.pt", "x")["step"] == 3


def test_train_resume_and_dataset_cache_never_run_code(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=2, save_every=2, eval_every=100)
    train(cfg, log=lambda *_: None)
    marker = tmp_path / "ran"
    # The dataset cache (derived data): refused, rebuilt, and the run goes on.
    crafted(Path(cfg.out_dir) / "data.pt", marker)
    lines: list[str] = []
    train(cfg.replace(steps=4, resume=True), log=lines.append)
    assert not marker.exists()
    assert any("refusing the dataset cache" in str(s) and "rebuilding" in str(s) for s in lines)
    assert C.latest_checkpoint(cfg.out_dir).name == "step_00000004"
    # The trainer state of the latest checkpoint: --resume refuses it.
    crafted(C.latest_checkpoint(cfg.out_dir) / "train_state.pt", marker)
    with pytest.raises(ValueError, match="refusing the trainer state"):
        train(cfg.replace(steps=6, resume=True), log=lambda *_: None)
    assert not marker.exists()


def test_drafter_caches_never_run_code(tmp_path):
    from trimode.train.drafter import DrafterConfig, train_drafter

    marker = tmp_path / "ran"
    cache = crafted(tmp_path / "data.pt", marker)
    with pytest.raises(ValueError, match="refusing the self-distillation cache"):
        train_drafter(DrafterConfig(model="bundled", out=str(tmp_path / "a"), steps=1, data_cache=str(cache)),
                      log=lambda s: None)
    assert not marker.exists()


def test_run_directory_survives_kills_mid_write(tmp_path, monkeypatch):
    """A truncated last line of log.jsonl does not block --resume; temporary checkpoint directories a
    killed writer left are removed at the next save; a dataset cache is never left half-written."""
    import json

    cfg = tiny_cfg(tmp_path, steps=4, save_every=2, eval_every=100)
    train(cfg.replace(stop_after=2), log=lambda *_: None)
    out = Path(cfg.out_dir)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "ar_loss": 1.2')  # the kill came mid-line
    root = C.checkpoint_root(out)
    (root / ".step_00000004.tmp-dead").mkdir()
    (root / ".step_00000004.tmp-dead" / "model.safetensors").write_bytes(b"\0" * 10)
    train(cfg.replace(resume=True), log=lambda *_: None)
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines() if '"ar_loss"' in x]
    assert steps == [1, 2, 3, 4]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []

    real = torch.save

    def full_disk(obj, f, *a, **k):
        if "data.pt" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # some bytes reached the disk
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    fresh = tiny_cfg(tmp_path / "b", steps=1, save_every=1, eval_every=100)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        train(fresh, log=lambda *_: None)
    assert not list(Path(fresh.out_dir).glob("*data.pt*"))  # neither a partial cache nor its temp file
    monkeypatch.undo()
    train(fresh, log=lambda *_: None)
