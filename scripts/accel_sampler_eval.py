"""Sampler evaluation: diffusion-mode tokens per forward vs agreement with AR greedy output on
held-out prompts, for the confidence-threshold policy, the learned sampler (MLP and block
transformer) at several thresholds, and the Oracle (speed-of-light) policy; writes a PNG.

    python scripts/accel_sampler_eval.py --model trimode/assets/bundled --sampler runs/accel/bundled_sampler \
        --prompts 16 --new 64 --block-len 8 --png docs/accel_sampler_bundled.png

Agreement = tokens equal to the AR greedy token at the same position / AR tokens (per prompt, then
averaged). Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from trimode import generate
from trimode.checkpoint import load_model
from trimode.decode.learned import LearnedPolicy, load_sampler
from trimode.decode.policies import Oracle, Threshold
from trimode.tokenizer import load_tokenizer
from trimode.train.drafter import resolve_model_dir
from trimode.train.evaluate import encode_files, heldout_paths, make_prompts


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--sampler", required=True, help="dir holding mlp/ and/or transformer/")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--block-len", type=int, default=8)
    p.add_argument("--taus", default="0.3,0.5,0.7,0.8,0.9,0.95,0.99")
    p.add_argument("--learned", default="0.2,0.35,0.5,0.65,0.8,0.9,0.95")
    p.add_argument("--kinds", default="mlp,transformer")
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    mdir = resolve_model_dir(args.model)
    model = load_model(mdir, dtype=torch.float32)
    tok = load_tokenizer(mdir)
    eos = model.config.eos_token_id
    docs = encode_files(tok, heldout_paths(mdir), eos)
    prompts = make_prompts(docs, args.prompts, args.prompt_len)
    torch.set_grad_enabled(False)
    ref = [g.tokens for g in generate(model, prompts, mode="ar", max_new_tokens=args.new, eos_id=eos)]
    full = [r + ([eos] if len(r) < args.new and eos is not None else []) for r in ref]

    def measure(name: str, knob: float | None, **kw) -> dict:
        t0 = time.perf_counter()
        gens = generate(model, prompts, mode="diffusion", max_new_tokens=args.new, block_len=args.block_len,
                        eos_id=eos, **kw)
        agree = [sum(a == b for a, b in zip(g.tokens, r)) / max(1, len(r)) for g, r in zip(gens, ref)]
        toks = sum(len(g.tokens) for g in gens)
        r = {"policy": name, "threshold": knob, "tpf": toks / sum(g.nfe for g in gens),
             "tpf_decode": toks / sum(g.stats["nfe_decode"] for g in gens),
             "agreement": sum(agree) / len(agree),
             "identical": sum(g.tokens == x for g, x in zip(gens, ref)) / len(ref),
             "seconds": time.perf_counter() - t0}
        print(json.dumps(r), file=sys.stderr, flush=True)
        return r

    rows = [measure("oracle", None, policy=Oracle(full))]
    rows += [measure("threshold", t, policy=Threshold(t)) for t in floats(args.taus)]
    for kind in args.kinds.split(","):
        s = load_sampler(f"{args.sampler}/{kind}")
        rows += [measure(f"learned-{kind}", t, policy=LearnedPolicy(s, t)) for t in floats(args.learned)]
    print(f"{len(prompts)} held-out prompts x {args.new} new tokens, block {args.block_len}")
    print("| policy | threshold | TPF | TPF (decode) | agreement with AR | identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        th = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"| {r['policy']} | {th} | {r['tpf']:.3f} | {r['tpf_decode']:.3f} | {r['agreement']:.3f} | "
              f"{r['identical'] * 100:.0f}% |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, style in (("threshold", "o-"), ("learned-mlp", "s-"), ("learned-transformer", "^-")):
            pts = sorted((r["tpf"], r["agreement"]) for r in rows if r["policy"] == name)
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        o = rows[0]
        ax.plot([o["tpf"]], [o["agreement"]], "r*", markersize=14, label="oracle (speed of light)")
        ax.set_xlabel("tokens per forward (prefill included)")
        ax.set_ylabel("agreement with AR greedy output")
        ax.set_title(f"diffusion unmasking policies, block {args.block_len}, {len(prompts)} held-out prompts")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
    print(json.dumps({"model": str(mdir), "sampler": args.sampler, "prompts": len(prompts), "new": args.new,
                      "block_len": args.block_len, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
