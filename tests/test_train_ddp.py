"""2-process CPU torchrun (gloo DDP) gives the same loss curve as 1 process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], *, nproc: int, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "trimode.train.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trimode.train.cli", *args]
    r = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_two_process_ddp_equals_single_process(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(4):
        (corpus / f"m{f}.py").write_text("".join(f"x{f} = {i} * {i % 5}\nprint(x{f})\n" for i in range(80)))
    common = ["--data", str(corpus), "--preset", "micro", "--vocab_size", "300", "--seq_len", "32",
              "--batch_size", "8", "--micro_batch_size", "2", "--steps", "5", "--warmup_steps", "1",
              "--lr", "3e-3", "--block_lens", "4,8", "--val_fraction", "0", "--log_every", "1",
              "--save_every", "100", "--eval_every", "100", "--progress", "false", "--bf16", "false",
              "--threads", "1"]
    # Same tokenizer and data for both runs: build it once, share it through --tokenizer.
    run_cli([*common, "--out_dir", str(tmp_path / "one"), "--micro_batch_size", "4"], nproc=1, cwd=tmp_path)
    tok = str(tmp_path / "one" / "tokenizer")
    run_cli([*common, "--out_dir", str(tmp_path / "ref"), "--tokenizer", tok], nproc=1, cwd=tmp_path)
    run_cli([*common, "--out_dir", str(tmp_path / "two"), "--tokenizer", tok], nproc=2, cwd=tmp_path)

    def curve(d: str) -> list[tuple[float, float]]:
        recs = [json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        return [(r["ar_loss"], r["diff_loss"]) for r in recs if "ar_loss" in r]

    ref, two = curve("ref"), curve("two")
    assert len(ref) == len(two) == 5
    for (a1, d1), (a2, d2) in zip(ref, two):
        assert a1 == pytest.approx(a2, rel=1e-4) and d1 == pytest.approx(d2, rel=1e-4)
    # A different micro-batch split (4 x 2 accumulation vs 2 x 4) is the same global batch too.
    one = curve("one")
    for (a1, d1), (a2, d2) in zip(ref, one):
        assert a1 == pytest.approx(a2, rel=1e-4) and d1 == pytest.approx(d2, rel=1e-4)
