"""The trainer: a short run lowers both losses, resume equals uninterrupted, bad input fails cleanly."""

import json
import os
from pathlib import Path

import pytest
import torch

from trimode.checkpoint import load_model, save_model
from trimode.train import checkpointing as C
from trimode.train.cli import main as train_main
from trimode.train.config import TrainConfig, build_config, parse_overrides
from trimode.train.loop import train


def write_corpus(root: Path, n_files: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = [f"def f{f}_{i}(x):\n    return x + {i % 7}\n\n" for i in range(60)]
        (root / f"mod{f}.py").write_text("".join(lines))
    return root


def tiny_cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = {
        "out_dir": str(tmp_path / "run"), "data": (str(write_corpus(tmp_path / "corpus")),), "preset": "micro",
        "vocab_size": 300, "seq_len": 32, "batch_size": 8, "micro_batch_size": 4, "steps": 20, "lr": 3e-3,
        "min_lr": 3e-4, "warmup_steps": 2, "block_lens": (4, 8), "val_fraction": 0.2, "save_every": 10,
        "eval_every": 10, "eval_batches": 2,
        "log_every": 1, "progress": False, "bf16": False, "seed": 0,
    }
    base.update(kw)
    return TrainConfig(**base)


def losses(out_dir: str) -> list[dict]:
    return [json.loads(x) for x in Path(out_dir, "log.jsonl").read_text().splitlines() if '"ar_loss"' in x]


def test_twenty_steps_lower_both_losses(tmp_path):
    cfg = tiny_cfg(tmp_path)
    last = train(cfg, log=lambda *_: None)
    recs = losses(cfg.out_dir)
    assert len(recs) == 20
    first_ar = sum(r["ar_loss"] for r in recs[:3]) / 3
    last_ar = sum(r["ar_loss"] for r in recs[-3:]) / 3
    first_d = sum(r["diff_loss"] for r in recs[:3]) / 3
    last_d = sum(r["diff_loss"] for r in recs[-3:]) / 3
    assert last_ar < first_ar - 0.5 and last_d < first_d - 0.5, (first_ar, last_ar, first_d, last_d)
    assert "val_ar_loss" in last and "val_diff_loss" in last
    ck = C.latest_checkpoint(cfg.out_dir)
    assert ck is not None and ck.name == "step_00000020"
    assert (ck / "tokenizer.json").exists() and (ck / "config.json").exists()
    model = load_model(ck)
    assert model.config.mask_token_id is not None


def test_resume_equals_uninterrupted(tmp_path):
    a = tiny_cfg(tmp_path / "a", steps=8, save_every=3, eval_every=100, bf16=True)
    train(a, log=lambda *_: None)
    b = a.replace(out_dir=str(tmp_path / "b" / "run"), stop_after=5)
    train(b, log=lambda *_: None)
    assert C.latest_checkpoint(b.out_dir).name == "step_00000005"
    train(b.replace(stop_after=None, resume=True), log=lambda *_: None)
    la, lb = losses(a.out_dir), losses(b.out_dir)
    assert [r["step"] for r in lb] == list(range(1, 9))
    for ra, rb in zip(la, lb):
        assert ra["ar_loss"] == pytest.approx(rb["ar_loss"], rel=1e-6, abs=1e-6)
        assert ra["diff_loss"] == pytest.approx(rb["diff_loss"], rel=1e-6, abs=1e-6)
    wa = load_model(C.latest_checkpoint(a.out_dir)).state_dict()
    wb = load_model(C.latest_checkpoint(b.out_dir)).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_ar_only_stage_then_joint(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=4, ar_only_steps=2, eval_every=100)
    train(cfg, log=lambda *_: None)
    recs = losses(cfg.out_dir)
    assert [r["diff_loss"] is None for r in recs] == [True, True, False, False]


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown training config keys"):
        build_config(None, {"no_such_key": "1"})
    with pytest.raises(ValueError, match="cannot convert"):
        build_config(None, {"steps": "many"})
    with pytest.raises(ValueError, match="dist must be 'ddp' or 'fsdp2'"):
        build_config(None, {"dist": "fsdp"})
    assert build_config(None, {"dist": "fsdp2"}).dist == "fsdp2"
    assert build_config(None, parse_overrides(["--block-lens", "4,8", "--bf16", "false"])).block_lens == (4, 8)
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nsteps = 7\n[data]\ndata = ["x"]\n')
    assert build_config(p, {"lr": "0.01"}).steps == 7
    assert train_main(["--nope", "1"]) == 2


def test_bad_corpus_and_init(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train(tiny_cfg(tmp_path, data=(str(empty),)), log=lambda *_: None)
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny_cfg(tmp_path, data=(str(tmp_path / "missing"),)), log=lambda *_: None)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        train(tiny_cfg(tmp_path, data=(str(bad),), out_dir=str(tmp_path / "r2")), log=lambda *_: None)
    small = tmp_path / "small.txt"
    small.write_text("a b c d " * 20)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny_cfg(tmp_path, data=(str(small),), out_dir=str(tmp_path / "r3"), val_fraction=0.0),
              log=lambda *_: None)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="lacks required field 'hidden_size'"):
        load_model(hf)
    rc = train_main(["--data", str(empty), "--out_dir", str(tmp_path / "r4"), "--progress", "false"])
    assert rc == 2 and "empty" in capsys.readouterr().err


def test_full_disk_never_leaves_a_broken_latest(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, steps=4, save_every=2, eval_every=100)
    train(cfg.replace(stop_after=2), log=lambda *_: None)
    good = C.latest_checkpoint(cfg.out_dir)
    assert good.name == "step_00000002"

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.torch, "save", no_space)
    with pytest.raises(C.CheckpointError, match="No space left"):
        train(cfg.replace(resume=True), log=lambda *_: None)
    assert C.latest_checkpoint(cfg.out_dir) == good
    leftovers = [p for p in os.listdir(C.checkpoint_root(cfg.out_dir)) if p.startswith(".tmp")]
    assert leftovers == []


def test_unreadable_corpus_file(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    locked = corpus / "mod2.py"
    real = Path.read_text

    def read_text(self, *a, **k):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(ValueError, match="cannot read corpus file .*mod2.py.*Permission denied"):
        train(tiny_cfg(tmp_path), log=lambda *_: None)


def test_init_or_resume_with_another_architecture(tmp_path):
    """--init with a dir that is no checkpoint, with weights that do not fit their config, with a vocabulary
    smaller than the tokenizer; --resume after changing the preset: each a ValueError, nothing trained."""
    from trimode.config import ModelConfig
    from trimode.model import Transformer, init_weights

    tok = Path(__file__).resolve().parents[1] / "trimode" / "assets" / "bundled"  # 4096 tokens, has <|mask|>

    def init_run(name: str, init: Path):
        return tiny_cfg(tmp_path, out_dir=str(tmp_path / name), init=str(init), tokenizer=str(tok), preset="micro")

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (llama / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="lacks required field"):
        train(init_run("r1", llama), log=lambda *_: None)

    mc = ModelConfig(vocab_size=4200, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_seq_len=256, mask_token_id=3)
    other = tmp_path / "other"
    save_model(init_weights(Transformer(mc), seed=0), other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))  # weights say 128
    with pytest.raises(ValueError, match="mlp.*has shape .*, expected"):
        train(init_run("r2", other), log=lambda *_: None)

    small = tmp_path / "small_vocab"
    save_model(init_weights(Transformer(mc.replace(vocab_size=300)), seed=0), small)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the --init model's vocabulary is 300"):
        train(init_run("r3", small), log=lambda *_: None)

    cfg = tiny_cfg(tmp_path, steps=2, stop_after=1, eval_every=100)
    train(cfg, log=lambda *_: None)
    before = C.latest_checkpoint(cfg.out_dir)
    with pytest.raises(ValueError, match="another architecture"):
        train(cfg.replace(preset="tiny", resume=True, stop_after=None), log=lambda *_: None)
    assert C.latest_checkpoint(cfg.out_dir) == before


def _assert_intact(out_dir: str, good: Path) -> None:
    """`latest` still names the previous complete checkpoint, it loads, and no temporary file is left."""
    import trimode

    assert C.latest_checkpoint(out_dir) == good
    trimode.load_model(good)
    assert torch.load(good / "train_state.pt", weights_only=True)["step"] == int(good.name.split("_")[1])
    root = C.checkpoint_root(out_dir)
    assert [p for p in os.listdir(root) if p.startswith(".")] == []
    assert sorted(p for p in os.listdir(root) if p.startswith("step_")) == [good.name]


def test_full_disk_while_writing_the_weights(tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through model.safetensors, as an OSError and as the SafetensorError safetensors
    really raises for it (measured on a full tmpfs); then through the command line (exit status 1)."""
    import errno

    import safetensors
    import safetensors.torch

    cfg = tiny_cfg(tmp_path, steps=4, save_every=2, eval_every=100)
    train(cfg.replace(stop_after=2), log=lambda *_: None)
    good = C.latest_checkpoint(cfg.out_dir)
    real_message = "Error while serializing: I/O error: No space left on device (os error 28)"
    for error in (OSError(errno.ENOSPC, "No space left on device"), safetensors.SafetensorError(real_message)):

        def half_written(tensors, filename, metadata=None, error=error):
            Path(filename).write_bytes(b"\0" * 1000)  # some bytes reached the disk, then it filled up
            raise error

        monkeypatch.setattr("trimode._io.save_file", half_written)  # the one weights writer
        with pytest.raises(C.CheckpointError, match="step_00000004.*No space left"):
            train(cfg.replace(resume=True), log=lambda *_: None)
        _assert_intact(cfg.out_dir, good)
    args = ["--data", cfg.data[0], "--out_dir", cfg.out_dir, "--resume", "--preset", "micro", "--vocab_size", "300",
            "--seq_len", "32", "--batch_size", "8", "--micro_batch_size", "4", "--steps", "4", "--lr", "3e-3",
            "--min_lr", "3e-4", "--warmup_steps", "2", "--block_lens", "4,8", "--val_fraction", "0.2",
            "--save_every", "2", "--eval_every", "100", "--eval_batches", "2", "--log_every", "1",
            "--progress", "false", "--bf16", "false"]
    assert train_main(args) == 1
    assert "could not write checkpoint" in capsys.readouterr().err
    _assert_intact(cfg.out_dir, good)


def test_full_disk_while_moving_the_latest_pointer(tmp_path, monkeypatch):
    """ENOSPC while writing the new `latest` pointer: the old pointer stays, its temp file is removed."""
    import builtins
    import errno

    cfg = tiny_cfg(tmp_path, steps=4, save_every=2, eval_every=100)
    train(cfg.replace(stop_after=2), log=lambda *_: None)
    good = C.latest_checkpoint(cfg.out_dir)

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return Full(f) if Path(path).name.startswith(f".{C.LATEST}.tmp") else f

    monkeypatch.setattr("trimode._io.open", fake_open, raising=False)  # where the pointer is written
    with pytest.raises(C.CheckpointError, match="No space left"):
        train(cfg.replace(resume=True), log=lambda *_: None)
    assert C.latest_checkpoint(cfg.out_dir) == good
    root = C.checkpoint_root(cfg.out_dir)
    assert [p for p in os.listdir(root) if p.startswith(".")] == []
    # The new step directory is complete (it was renamed into place before the pointer write) but
    # not `latest`; resuming continues from the good one.
    monkeypatch.undo()
    train(cfg.replace(resume=True), log=lambda *_: None)
    assert C.latest_checkpoint(cfg.out_dir).name == "step_00000004"
