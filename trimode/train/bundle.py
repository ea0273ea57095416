"""Export a training checkpoint as the bundled model (`trimode/assets/bundled`).

`python -m trimode.train.bundle RUN_DIR [--out DIR] [--step N]`

Weights are stored in float16 (half the bytes; the loader widens float16 to float32 on CPU), with
the tokenizer files and `heldout_files.json`: the stdlib files held out of training (paths relative
to the interpreter's stdlib), which `trimode.train.evaluate` uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .._io import load_state
from ..checkpoint import load_model, write_model
from ..tokenizer import load_tokenizer
from . import checkpointing as C

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "bundled"


def export(run_dir: str | Path, out: str | Path = DEFAULT_OUT, *, step: int | None = None) -> Path:
    run = Path(run_dir)
    ck = C.checkpoint_root(run) / f"step_{step:08d}" if step is not None else C.latest_checkpoint(run)
    if ck is None or not (ck / "model.safetensors").exists():
        raise ValueError(f"no checkpoint found in {str(run)!r}")
    model = load_model(ck, dtype=torch.float16)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_model(model, out, tokenizer=load_tokenizer(ck))
    info_path = run / "data_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        state = load_state(ck / "train_state.pt", "the trainer state")
        (out / "heldout_files.json").write_text(json.dumps({
            "root": "sysconfig.get_paths()['stdlib']", "files": info["val_files"],
            "train_files": info["files_train"], "train_tokens": info["tokens_train"],
            "val_tokens": info["tokens_val"], "step": int(state["step"]),
        }, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m trimode.train.bundle RUN_DIR [--out DIR] [--step N]", file=sys.stderr)
        return 2
    run, out, step = argv[0], DEFAULT_OUT, None
    rest = argv[1:]
    while rest:
        if rest[0] == "--out" and len(rest) > 1:
            out, rest = Path(rest[1]), rest[2:]
        elif rest[0] == "--step" and len(rest) > 1:
            step, rest = int(rest[1]), rest[2:]
        else:
            print(f"unexpected argument {rest[0]!r}", file=sys.stderr)
            return 2
    try:
        path = export(run, out, step=step)
    except ValueError as e:
        print(f"bundle: error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
