"""FSDP2 (`--dist fsdp2`, `fully_shard`) on 2 CPU gloo ranks under torchrun.

- its loss curve (and grad norms, validation losses and final weights) equals the 1-process run on the
  same global batch, with gradient accumulation (2 micro-batches per rank) and grad clipping active
  (norms > grad_clip);
- its checkpoints are full state dicts: they load with `trimode.load_model`, a 1-process run resumes
  from one, and an FSDP2 run resumes from one, each equal to the uninterrupted run.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trimode
from trimode.train import checkpointing as C
from trimode.train.config import build_config, parse_overrides
from trimode.train.loop import train

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    HAVE_FSDP2 = True
except ImportError:  # pragma: no cover - torch < 2.6
    HAVE_FSDP2 = False

pytestmark = pytest.mark.skipif(not HAVE_FSDP2, reason="torch.distributed.fsdp.fully_shard not available")

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-4  # the tolerance of the DDP test


def run_torchrun(args: list[str], *, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trimode.train.cli", *args]
    r = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def common_args(corpus: Path, val: Path) -> list[str]:
    # batch 8 = 2 ranks x micro 2 x accumulation 2 (1 process: micro 2 x accumulation 4); checkpoints
    # at steps 3 and 5; validation (4 rows of micro_batch_size 2) at steps 0, 2, 4 and 5.
    return ["--data", str(corpus), "--val_data", str(val), "--preset", "micro", "--vocab_size", "300",
            "--seq_len", "32", "--batch_size", "8", "--micro_batch_size", "2", "--steps", "5",
            "--warmup_steps", "1", "--lr", "3e-3", "--block_lens", "4,8", "--log_every", "1",
            "--save_every", "3", "--eval_every", "2", "--eval_batches", "2", "--eval_at_start", "true",
            "--progress", "false", "--bf16", "false"]


def curve(out: Path) -> list[dict]:
    """Every log record (training steps and validation), without the timing."""
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]


def assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            assert va == pytest.approx(rb[key], rel=REL), (ra["step"], key, va, rb[key])


def assert_same_weights(ck_a: Path, ck_b: Path) -> None:
    wa = trimode.load_model(ck_a).state_dict()
    wb = trimode.load_model(ck_b).state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose `latest` checkpoint is the one of `step` (as if it had stopped there)."""
    shutil.copytree(src, dst)
    (C.checkpoint_root(dst) / C.LATEST).write_text(f"step_{step:08d}\n")
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process reference (in this process) and the uninterrupted 2-process FSDP2 run."""
    tmp = tmp_path_factory.mktemp("fsdp")
    corpus, val = tmp / "corpus", tmp / "val"
    corpus.mkdir()
    val.mkdir()
    for f in range(4):
        (corpus / f"m{f}.py").write_text("".join(f"x{f} = {i} * {i % 5}\nprint(x{f})\n" for i in range(80)))
    (val / "v.py").write_text("".join(f"y = {i} + {i % 3}\nprint(y)\n" for i in range(60)))
    args = common_args(corpus, val)
    train(build_config(None, parse_overrides([*args, "--out_dir", str(tmp / "ref")])), log=lambda *_: None)
    args += ["--tokenizer", str(tmp / "ref" / "tokenizer")]  # the same tokens for every run
    run_torchrun([*args, "--out_dir", str(tmp / "fsdp"), "--dist", "fsdp2"], cwd=tmp)
    return tmp, args


def test_fsdp2_two_processes_equal_one_process(runs):
    tmp, _ = runs
    ref, fsdp = curve(tmp / "ref"), curve(tmp / "fsdp")
    assert [r["step"] for r in ref if "ar_loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in ref if "val_ar_loss" in r] == [0, 2, 4, 5]
    assert max(r["grad_norm"] for r in ref if "grad_norm" in r) > 1.0  # clipping (grad_clip 1.0) is exercised
    assert_same_curve(ref, fsdp)
    state = torch.load(C.latest_checkpoint(tmp / "fsdp") / "train_state.pt", weights_only=True)
    assert (state["dist"], state["world_size"]) == ("fsdp2", 2)
    # Full (unsharded) checkpoints: every tensor has its full shape and loads with trimode.load_model.
    for step in (3, 5):
        name = f"step_{step:08d}"
        assert_same_weights(C.checkpoint_root(tmp / "ref") / name, C.checkpoint_root(tmp / "fsdp") / name)


def test_one_process_resumes_an_fsdp2_checkpoint(runs):
    tmp, args = runs
    out = rewind(tmp / "fsdp", tmp / "fsdp_then_1proc", 3)
    cfg = build_config(None, parse_overrides([*args, "--out_dir", str(out), "--resume"]))
    train(cfg, log=lambda *_: None)
    assert_same_curve(curve(tmp / "fsdp"), curve(out))
    assert_same_weights(C.latest_checkpoint(tmp / "fsdp"), C.latest_checkpoint(out))


def test_fsdp2_resume_equals_uninterrupted(runs):
    tmp, args = runs
    out = rewind(tmp / "fsdp", tmp / "fsdp_resumed", 3)
    run_torchrun([*args, "--out_dir", str(out), "--dist", "fsdp2", "--resume"], cwd=tmp)
    assert_same_curve(curve(tmp / "fsdp"), curve(out))
    assert_same_weights(C.latest_checkpoint(tmp / "fsdp"), C.latest_checkpoint(out))
    assert_same_weights(C.latest_checkpoint(tmp / "ref"), C.latest_checkpoint(out))


def test_fsdp2_full_disk_stops_every_rank(runs, tmp_path):
    """Rank 0 hits ENOSPC while writing a checkpoint: both ranks exit with the error (none hangs in a
    collective waiting for it), no temporary directory is left and `latest` still names step 3."""
    tmp, args = runs
    out = rewind(tmp / "fsdp", tmp_path / "full", 3)
    script = tmp_path / "full_disk.py"
    script.write_text(
        "import errno, sys\n"
        "import torch\n"
        "from trimode.train.cli import main\n"
        "def no_space(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "torch.save = no_space\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *args, "--out_dir", str(out), "--dist", "fsdp2", "--resume", "--eval_every", "100"]
    r = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "could not write checkpoint" in err and "No space left" in err, err[-3000:]
    assert "rank 0 could not write the checkpoint of step 5" in err, err[-3000:]
    assert C.latest_checkpoint(out).name == "step_00000003"
    assert [p for p in os.listdir(C.checkpoint_root(out)) if p.startswith(".")] == []
