"""Evaluate a tri-mode checkpoint on held-out files: losses and the four decoders.

`python -m trimode.train.evaluate [--model DIR] [--files F ...] [--prompts N] [--new N] [--json]`

Defaults to the bundled model and the standard-library files it never saw (heldout_files.json in
its directory, paths relative to the running interpreter's stdlib). Prints
- validation AR loss (nats/token) and diffusion loss (sum CE/p over masked / masked count, the
  training estimator, with fixed noise) on the held-out files, packed like the training data;
- for prompts cut from the held-out files: whether linear and quadratic self-speculation reproduce
  the AR greedy output exactly, the mean accepted length per linear verify (accepted + bonus),
  quadratic tokens per forward at several block lengths, and diffusion (threshold 0.9) tokens per
  forward with its token agreement with the AR output.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "bundled"


def heldout_paths(model_dir: Path) -> list[Path]:
    f = model_dir / "heldout_files.json"
    if not f.exists():
        raise ValueError(f"{model_dir} has no heldout_files.json; pass --files")
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / k for k in json.loads(f.read_text())["files"]]
    found = [p for p in paths if p.exists()]
    if not found:
        raise ValueError(f"none of the held-out files exist under {root}")
    return found


def encode_files(tok, paths: list[Path], eos_id: int | None) -> list[list[int]]:
    out = []
    for p in paths:
        ids = tok.encode(p.read_text(encoding="utf-8"))
        out.append(ids + ([eos_id] if eos_id is not None else []))
    return out


@torch.no_grad()
def val_losses(model, docs: list[list[int]], *, seq_len: int = 256, block_len: int = 32, max_rows: int = 64,
               seed: int = 0) -> dict[str, float]:
    from .losses import ar_loss, diffusion_loss, dual_stream_inputs, split_dual
    from .noise import noise_batch

    flat = [t for d in docs for t in d]
    n = min(max_rows, len(flat) // seq_len)
    if n == 0:
        raise ValueError("held-out text is shorter than one sequence")
    x0 = torch.tensor(flat[: n * seq_len]).view(n, seq_len)
    lm = torch.ones_like(x0, dtype=torch.bool)
    tot = torch.zeros(4, dtype=torch.float64)
    for s in range(0, n, 8):
        x, m = x0[s:s + 8], lm[s:s + 8]
        rows = list(range(s, s + x.shape[0]))
        xt, masked, p, bls = noise_batch(x, m, rows, seed=seed, mask_id=model.config.mask_token_id,
                                         block_lens=[block_len])
        tokens, positions, mask = dual_stream_inputs(xt, x, bls)
        noisy, clean = split_dual(model(tokens, positions, mask=mask))
        a = ar_loss(clean, x)
        d = diffusion_loss(noisy, x, masked, p, dlm_type=model.config.dlm_type)
        tot += torch.tensor([float(a[0]), float(a[1]), float(d[0]), float(d[1])], dtype=torch.float64)
    return {"val_ar_loss": float(tot[0] / tot[1]), "val_diff_loss": float(tot[2] / tot[3]),
            "val_tokens": int(n * seq_len)}


def make_prompts(docs: list[list[int]], n: int, prompt_len: int) -> list[list[int]]:
    """Up to n prompts, evenly spaced windows over the held-out token streams."""
    windows = []
    for d in docs:
        for start in range(0, max(0, len(d) - prompt_len - 64), 512):
            windows.append(d[start:start + prompt_len])
    if not windows:
        raise ValueError("held-out files are too short for prompts")
    step = max(1, len(windows) // n)
    return windows[::step][:n]


def decode_eval(model, prompts: list[list[int]], *, new: int, spec_lens=(2, 4, 8),
                diff_block: int = 8) -> dict[str, Any]:
    from ..decode import generate

    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    ar = generate(model, prompts, mode="ar", max_new_tokens=new)
    res["ar"] = {"tpf_decode": _mean(g.stats["tpf_decode"] for g in ar), "seconds": time.perf_counter() - t0}
    ref = [g.tokens for g in ar]
    for mode in ("linear", "quadratic"):
        for k in spec_lens:
            t0 = time.perf_counter()
            try:
                gens = generate(model, prompts, mode=mode, max_new_tokens=new, block_len=k)
            except (RuntimeError, ValueError) as e:  # report a decoder failure, keep measuring the rest
                res[f"{mode}_k{k}"] = {"error": str(e), "tpf_decode": float("nan"), "seconds": 0.0}
                continue
            acc = [a for g in gens for a in g.stats["acceptance"]]
            res[f"{mode}_k{k}"] = {
                "identical_to_ar": sum(g.tokens == r for g, r in zip(gens, ref)) / len(ref),
                "mean_acceptance": sum(acc) / len(acc) if acc else None,
                "tpf_decode": _mean(g.stats["tpf_decode"] for g in gens),
                "tpf": _mean(g.stats["tpf"] for g in gens),
                "seconds": time.perf_counter() - t0,
            }
    t0 = time.perf_counter()
    gens = generate(model, prompts, mode="diffusion", max_new_tokens=new, block_len=diff_block, threshold=0.9)
    agree = [sum(a == b for a, b in zip(g.tokens, r)) / max(1, min(len(g.tokens), len(r))) for g, r in zip(gens, ref)]
    res[f"diffusion_b{diff_block}_t0.9"] = {
        "tpf_decode": _mean(g.stats["tpf_decode"] for g in gens),
        "agreement_with_ar": _mean(agree),
        "identical_to_ar": sum(g.tokens == r for g, r in zip(gens, ref)) / len(ref),
        "seconds": time.perf_counter() - t0,
    }
    return res


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint import load_model
    from ..tokenizer import load_tokenizer

    argv = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, Any] = {"model": str(BUNDLED), "prompts": "16", "new": "64", "prompt_len": "96",
                            "diff_block": "8", "files": None}
    as_json = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--json":
            as_json, i = True, i + 1
        elif a == "--files":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            opts["files"], i = argv[i + 1:j], j
        elif a.startswith("--") and a[2:].replace("-", "_") in opts and i + 1 < len(argv):
            opts[a[2:].replace("-", "_")], i = argv[i + 1], i + 2
        else:
            print(f"evaluate: unexpected argument {a!r}", file=sys.stderr)
            return 2
    try:
        mdir = Path(opts["model"])
        model = load_model(mdir, dtype=torch.float32).eval()
        tok = load_tokenizer(mdir)
        if tok is None:
            raise ValueError(f"{mdir} has no tokenizer")
        paths = [Path(f) for f in opts["files"]] if opts["files"] else heldout_paths(mdir)
        docs = encode_files(tok, paths, model.config.eos_token_id)
        torch.set_grad_enabled(False)
        out: dict[str, Any] = {"model": str(mdir), "heldout_files": len(paths)}
        out.update(val_losses(model, docs, block_len=model.config.block_len))
        prompts = make_prompts(docs, int(opts["prompts"]), int(opts["prompt_len"]))
        out["prompts"], out["new_tokens"] = len(prompts), int(opts["new"])
        out["decode"] = decode_eval(model, prompts, new=int(opts["new"]), diff_block=int(opts["diff_block"]))
    except ValueError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(out))
        return 0
    print(f"model {out['model']}  held-out files {out['heldout_files']}  tokens {out['val_tokens']}")
    print(f"val AR loss {out['val_ar_loss']:.4f}   val diffusion loss {out['val_diff_loss']:.4f}")
    print(f"{out['prompts']} prompts x {out['new_tokens']} new tokens (greedy)")
    print(f"{'decoder':<22}{'identical':>10}{'mean acc':>10}{'tpf_dec':>9}{'agree':>8}{'sec':>8}")
    for name, r in out["decode"].items():
        if "error" in r:
            print(f"{name:<22}error: {r['error']}")
            continue
        acc = r.get("mean_acceptance")
        print(f"{name:<22}{_fmt(r.get('identical_to_ar')):>10}{_fmt(acc):>10}{r['tpf_decode']:>9.3f}"
              f"{_fmt(r.get('agreement_with_ar')):>8}{r['seconds']:>8.1f}")
    print(json.dumps(out))
    return 0


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
