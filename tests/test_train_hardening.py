"""Training run directories and the training commands: unwritable outputs fail at once in one line,
SIGTERM stops with a checkpoint that resumes bit-identically, a failed run leaves no directory, a
damaged run tokenizer is refused (never copied on), one summary line under torchrun, a warning for a
warm-up longer than the run, and `--model bundled` never writes into the installed package."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_train_loop import losses, tiny_cfg, write_corpus

from trimode.models import BUNDLED
from trimode.train import checkpointing as C
from trimode.train.cli import main as train_main
from trimode.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
QUIET = lambda *_: None  # noqa: E731


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRIMODE_CACHE": str(tmp / "cache")}


def cli_args(cfg) -> list[str]:
    """`trimode train` flags that build exactly `cfg` (the fields tiny_cfg sets)."""
    keys = ("out_dir", "data", "preset", "vocab_size", "seq_len", "batch_size", "micro_batch_size", "steps", "lr",
            "min_lr", "warmup_steps", "block_lens", "val_fraction", "save_every", "eval_every", "eval_batches",
            "log_every", "progress", "bf16", "seed", "tokenizer", "threads")
    out = []
    for k in keys:
        v = getattr(cfg, k)
        if v is None:
            continue
        out += [f"--{k}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool)
                else str(v)]
    return out


# -- 1. unwritable output directories --------------------------------------------------------------
def _as_unprivileged() -> list[str]:
    """A command prefix under which a mode-0555 directory is read-only, even for root (which bypasses
    permission bits through CAP_DAC_OVERRIDE: dropped here with setpriv)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be made")
    return ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("command", ["train", "train-drafter", "train-sampler"])
def test_read_only_output_directory_is_one_clear_line_before_any_work(command, tmp_path):
    base = Path(tempfile.mkdtemp(prefix="trimode-ro-"))
    try:
        ro = base / "ro"
        ro.mkdir()
        corpus = write_corpus(base / "corpus", n_files=2)
        os.chmod(ro, 0o555)
        args = {
            "train": ["--data", str(corpus), "--out_dir", str(ro / "run"), "--preset", "micro", "--progress", "false"],
            "train-drafter": ["--model", "bundled", "--out", str(ro / "draft"), "--steps", "1", "--n-prompts", "2",
                              "--new-tokens", "4", "--gen-batch", "2", "--batch", "2", "--blocks-per-seq", "2",
                              "--block-len", "4"],
            "train-sampler": ["--model", "bundled", "--out", str(ro / "sampler"), "--n-prompts", "2",
                              "--new-tokens", "8", "--batch", "2", "--steps", "2", "--rounds", "0", "--kinds", "mlp"],
        }[command]
        r = subprocess.run([*_as_unprivileged(), sys.executable, "-m", "trimode.cli", command, *args], cwd=base,
                           env=env(tmp_path), capture_output=True, text=True, timeout=180, check=False)
        err = r.stderr.strip()
        assert r.returncode in (1, 2), (r.returncode, r.stdout[-2000:], err[-3000:])
        assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
        assert f"trimode {command}: error:" in err and str(ro) in err and "Permission denied" in err, err
        assert r.stdout.strip() == "", r.stdout  # failed before loading a model or reading the corpus
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_output_directory_under_a_file_is_one_clear_line(tmp_path, capsys):
    from trimode.train.drafter import main as drafter_main
    from trimode.train.sampler import main as sampler_main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    corpus = write_corpus(tmp_path / "corpus", n_files=2)
    assert train_main(["--data", str(corpus), "--out_dir", str(blocker / "run"), "--progress", "false"]) == 2
    assert drafter_main(["--model", "bundled", "--out", str(blocker / "draft"), "--steps", "1"]) == 2
    assert sampler_main(["--model", "bundled", "--out", str(blocker / "s"), "--rounds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(str(blocker) in e and "is not a directory" in e for e in err), err


def test_a_write_failing_during_the_run_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """A directory that turns unwritable after the up-front check: exit 1, one line naming the file."""
    import trimode.decode.learned
    import trimode.peft
    from trimode.train import loop
    from trimode.train.drafter import main as drafter_main
    from trimode.train.sampler import main as sampler_main

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "gone" / "file"))

    cfg = tiny_cfg(tmp_path, steps=2)
    monkeypatch.setattr(loop.Run, "write_log", denied)
    assert train_main(cli_args(cfg)) == 1
    monkeypatch.setattr(trimode.peft, "save_adapter", denied)
    assert drafter_main(["--model", "bundled", "--out", str(tmp_path / "d"), "--steps", "1", "--n-prompts", "2",
                         "--new-tokens", "4", "--gen-batch", "2", "--batch", "2", "--blocks-per-seq", "2",
                         "--block-len", "4", "--save-every", "0"]) == 1
    monkeypatch.setattr(trimode.decode.learned.Sampler, "save", denied)
    assert sampler_main(["--model", "bundled", "--out", str(tmp_path / "s"), "--n-prompts", "2", "--new-tokens", "8",
                         "--batch", "2", "--steps", "2", "--rounds", "0", "--kinds", "mlp"]) == 1
    err = [e for e in capsys.readouterr().err.splitlines() if e.strip()]
    want = f"{tmp_path / 'gone' / 'file'}: Permission denied"
    assert [e for e in err if "error:" in e] == [f"trimode {c}: error: {want}"
                                                 for c in ("train", "train-drafter", "train-sampler")], err


# -- 2. SIGTERM: finish the step, checkpoint, exit 0; --resume is bit-identical -------------------------
HOOK = r"""
import sys
import trimode.train.drafter as D
import trimode.train.loop as L
from trimode.cli import main

at, calls = int(sys.argv[1]), [0]

def wait_for_the_signal():  # the parent sends SIGTERM now, then a newline
    print("READY", flush=True)
    sys.stdin.readline()

real_step, real_loss = L.train_step, D.drafter_loss

def train_step(run, s):
    rec = real_step(run, s)
    if s + 1 == at:
        wait_for_the_signal()
    return rec

def drafter_loss(*a, **k):  # inside step `at`: it still finishes
    calls[0] += 1
    if calls[0] == at:
        wait_for_the_signal()
    return real_loss(*a, **k)

L.train_step, D.drafter_loss = train_step, drafter_loss
raise SystemExit(main(sys.argv[2:]))
"""


def sigterm_at(at: int, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, "-c", HOOK, str(at), *argv], cwd=tmp_path, env=env(tmp_path),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in p.stdout:
            seen.append(line)
            if line.strip() == "READY":
                break
        else:
            raise AssertionError("the run ended before the hook: " + "".join(seen) + p.stderr.read()[-3000:])
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate("\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return subprocess.CompletedProcess(p.args, p.returncode, "".join(seen) + out, err)


def test_sigterm_writes_an_exit_checkpoint_and_resume_is_bit_identical(tmp_path):
    from trimode.checkpoint import load_model

    ref = tiny_cfg(tmp_path / "a", steps=6, save_every=100, eval_every=100, threads=1)
    train(ref, log=QUIET)
    cut = ref.replace(out_dir=str(tmp_path / "b" / "run"), tokenizer=str(Path(ref.out_dir) / "tokenizer"))
    r = sigterm_at(3, ["train", *cli_args(cut)], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "stopped by SIGTERM at step 3; resume with --resume" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr
    assert C.latest_checkpoint(cut.out_dir).name == "step_00000003"  # the only one: save_every is 100
    assert [x["step"] for x in losses(cut.out_dir)] == [1, 2, 3]
    train(cut.replace(resume=True), log=QUIET)
    la, lb = losses(ref.out_dir), losses(cut.out_dir)
    assert [x["step"] for x in lb] == list(range(1, 7))
    assert [(x["ar_loss"], x["diff_loss"]) for x in la] == [(x["ar_loss"], x["diff_loss"]) for x in lb]
    wa = load_model(C.latest_checkpoint(ref.out_dir)).state_dict()
    wb = load_model(C.latest_checkpoint(cut.out_dir)).state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_stops_train_drafter_with_its_state_and_rerunning_resumes_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from trimode.train.drafter import STATE, DrafterConfig, train_drafter

    base = dict(model="bundled", n_prompts=4, new_tokens=8, gen_batch=4, steps=5, batch=2, blocks_per_seq=2,
                block_lens=(4,), save_every=0, log_every=1, data_cache=str(tmp_path / "data.pt"))
    train_drafter(DrafterConfig(out=str(tmp_path / "full"), **base), log=QUIET)
    argv = ["train-drafter", "--model", "bundled", "--out", str(tmp_path / "cut"), "--n-prompts", "4",
            "--new-tokens", "8", "--gen-batch", "4", "--steps", "5", "--batch", "2", "--blocks-per-seq", "2",
            "--block-len", "4", "--save-every", "0", "--log-every", "1", "--data-cache", base["data_cache"]]
    r = sigterm_at(3, argv, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "stopped by SIGTERM at step 3" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert (tmp_path / "cut" / STATE).exists()
    lines: list[str] = []
    train_drafter(DrafterConfig(out=str(tmp_path / "cut"), **base), log=lines.append)
    assert any(s.startswith("resuming from step 3") for s in lines), lines
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "full" / "training.json").read_text())["history"]
    hb = json.loads((tmp_path / "cut" / "training.json").read_text())["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


# -- 3. a failed run leaves no output directory ------------------------------------------------------
def test_a_run_that_fails_before_it_starts_leaves_no_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert train_main(["--data", str(empty), "--progress", "false"]) == 2  # out_dir: runs/default
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    small = tmp_path / "small.txt"  # fails after the tokenizer was trained and written
    small.write_text("a b c d " * 20)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny_cfg(tmp_path, data=(str(small),), out_dir=str(tmp_path / "deep" / "er" / "run"),
                       val_fraction=0.0), log=QUIET)
    assert not (tmp_path / "deep").exists()
    mine = tmp_path / "mine"  # a directory the user made is left alone, with what it held
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    with pytest.raises(ValueError, match="empty"):
        train(tiny_cfg(tmp_path, data=(str(empty),), out_dir=str(mine)), log=QUIET)
    assert (mine / "notes.txt").read_text() == "keep\n"


# -- 4. a damaged run tokenizer is refused, never copied on ------------------------------------------------
@pytest.mark.parametrize("damage", [("tokenizer.json", "garbage"), ("tokenizer_config.json", '{"eos_token": 5')])
def test_a_damaged_run_tokenizer_is_refused_before_training(damage, tmp_path):
    cfg = tiny_cfg(tmp_path, steps=2, save_every=2, eval_every=100)
    train(cfg, log=QUIET)
    name, text = damage
    (Path(cfg.out_dir) / "tokenizer" / name).write_text(text)
    with pytest.raises(ValueError, match=f"run's tokenizer .*tokenizer.*unusable.*{name}"):
        train(cfg.replace(steps=4, resume=True), log=QUIET)
    assert [r["step"] for r in losses(cfg.out_dir)] == [1, 2]  # not one step trained
    assert C.latest_checkpoint(cfg.out_dir).name == "step_00000002"
    assert sorted(p.name for p in C.checkpoint_root(cfg.out_dir).iterdir()) == ["latest", "step_00000002"]


def test_a_damaged_source_tokenizer_is_refused_before_copying(tmp_path):
    src = tmp_path / "tok"
    shutil.copytree(BUNDLED, src, ignore=shutil.ignore_patterns("*.safetensors", "heldout_files.json"))
    (src / "tokenizer_config.json").write_text("{ not json")
    cfg = tiny_cfg(tmp_path, tokenizer=str(src), steps=1)
    with pytest.raises(ValueError, match="tokenizer .*unusable.*tokenizer_config.json"):
        train(cfg, log=QUIET)
    assert not Path(cfg.out_dir).exists()


# -- 5. one summary line under torchrun ------------------------------------------------------------------
def test_only_rank_0_prints_the_summary_under_torchrun(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=2, micro_batch_size=2, save_every=100, eval_every=100, val_fraction=0.0,
                   threads=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "trimode.train.cli", *cli_args(cfg)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=240,
                       check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    # Counted, not split into lines: two ranks writing at once can interleave their lines.
    assert r.stdout.count("step=2 ar_loss=") == 1 and r.stdout.count("step=") == 1, r.stdout


# -- 6. a warm-up that fills the run ---------------------------------------------------------------------
def test_warmup_longer_than_the_run_warns_once_on_stderr(tmp_path, capsys):
    train(tiny_cfg(tmp_path, steps=3, warmup_steps=5, save_every=100, eval_every=100), log=QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warmup_steps 5 >= steps 3" in err[0] and err[0].startswith("warning:"), err
    train(tiny_cfg(tmp_path / "b", steps=3, warmup_steps=2, save_every=100, eval_every=100), log=QUIET)
    assert "warmup" not in capsys.readouterr().err


# -- 7. --model bundled never writes into the package ------------------------------------------------------
def test_bundled_drafter_and_sampler_default_to_a_user_directory(tmp_path, monkeypatch, capsys):
    from trimode.checkpoint import load_model
    from trimode.decode.learned import load_sampler
    from trimode.models import resolve_model
    from trimode.train.drafter import main as drafter_main
    from trimode.train.sampler import main as sampler_main

    monkeypatch.setenv("TRIMODE_CACHE", str(tmp_path / "cache"))
    before = sorted(p.relative_to(BUNDLED) for p in BUNDLED.rglob("*"))
    try:
        assert drafter_main(["--model", "bundled", "--steps", "1", "--n-prompts", "2", "--new-tokens", "4",
                             "--gen-batch", "2", "--batch", "2", "--blocks-per-seq", "2", "--block-len", "4",
                             "--save-every", "0"]) == 0
        assert sampler_main(["--model", "bundled", "--n-prompts", "2", "--new-tokens", "8", "--batch", "2",
                             "--steps", "2", "--rounds", "0", "--kinds", "mlp"]) == 0
        assert sorted(p.relative_to(BUNDLED) for p in BUNDLED.rglob("*")) == before  # the package is untouched
    finally:  # on the code before the fix: put the package back
        for extra in ("adapters", "sampler"):
            if Path(extra) not in before and (BUNDLED / extra).exists():
                shutil.rmtree(BUNDLED / extra)
    out = capsys.readouterr().out
    user = tmp_path / "cache" / "trained" / "bundled"
    assert (user / "draft" / "adapter_model.safetensors").is_file() and str(user / "draft") in out
    assert load_sampler(user / "sampler").kind == "mlp"
    assert resolve_model("bundled") == BUNDLED and not load_model(BUNDLED).adapter_names()  # demo / serve
