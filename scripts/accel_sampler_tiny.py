"""Sampler curves on the tiny arithmetic model of tests/_accel.py (where diffusion has room to win):
TPF vs agreement with AR for the threshold, learned (MLP / transformer) and oracle policies on
held-out prompts; writes docs/accel_sampler_tiny.png.

    PYTHONPATH=. python scripts/accel_sampler_tiny.py [--steps 100] [--png docs/accel_sampler_tiny.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _accel import prompts, trained_tiny  # noqa: E402

from trimode import generate  # noqa: E402
from trimode.decode.learned import LearnedPolicy  # noqa: E402
from trimode.decode.policies import JointThreshold, Oracle, Threshold  # noqa: E402
from trimode.train.sampler import collect, evaluate_scores, train_samplers  # noqa: E402


def envelope(points, hull: bool = False):
    """Agreement of a policy family at a given TPF: its best point per TPF, linear between
    neighbours (hull=True: the upper concave hull, i.e. also every mix of two settings, which
    switching per prompt would reach); None outside its TPF range."""
    pts = sorted(points)
    best: dict[float, float] = {}
    for x, y in pts:
        best[x] = max(best.get(x, 0.0), y)
    xs = sorted(best)
    pts_: list[tuple[float, float]] = []
    for x in xs:
        p = (x, best[x])
        while hull and len(pts_) >= 2 and (pts_[-1][1] - pts_[-2][1]) * (p[0] - pts_[-2][0]) <= \
                (p[1] - pts_[-2][1]) * (pts_[-1][0] - pts_[-2][0]):
            pts_.pop()
        pts_.append(p)

    def at(x: float):
        if not pts_ or x < pts_[0][0] - 1e-9 or x > pts_[-1][0] + 1e-9:
            return None
        for (x0, y0), (x1, y1) in zip(pts_, pts_[1:]):
            if x0 - 1e-9 <= x <= x1 + 1e-9:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return pts_[0][1]

    return at


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100, help="base-model training steps")
    p.add_argument("--fit-steps", type=int, default=200)
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--block-len", type=int, default=8)
    p.add_argument("--held", type=int, default=256, help="held-out prompts")
    p.add_argument("--rounds", type=int, default=2, help="on-policy (DAgger) rounds")
    p.add_argument("--png", default="docs/accel_sampler_tiny.png")
    args = p.parse_args(argv)
    m = trained_tiny(args.steps)
    K, N = args.block_len, args.new
    quiet = lambda s: None  # noqa: E731
    samplers, _, _ = train_samplers(m, prompts(96, 1), ["mlp", "transformer"], block_len=K, new=N, eos_id=None,
                                    rounds=args.rounds, steps=args.fit_steps, batch=96, fit_batch=128, log=quiet)
    held_p = prompts(args.held, 2)
    held = collect(m, held_p, block_len=K, new=N, eos_id=None, batch=64, seed=1, log=quiet)
    print("held-out scores:", json.dumps({"confidence": evaluate_scores(None, held),
                                          **{k: evaluate_scores(s, held) for k, s in samplers.items()}}))
    with torch.no_grad():
        ref = [g.tokens for g in generate(m, held_p, mode="ar", max_new_tokens=N)]
    rows = []

    def measure(name, knob, policy):
        with torch.no_grad():
            gens = generate(m, held_p, mode="diffusion", max_new_tokens=N, block_len=K, policy=policy)
        agree = [sum(a == b for a, b in zip(g.tokens, r)) / len(r) for g, r in zip(gens, ref)]
        toks = sum(len(g.tokens) for g in gens)
        rows.append({"policy": name, "threshold": knob, "tpf": toks / sum(g.nfe for g in gens),
                     "agreement": sum(agree) / len(agree)})

    measure("oracle", None, Oracle(ref))
    for t in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        measure("threshold", t, Threshold(t))
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        measure("threshold-joint", t, JointThreshold(t))
    for k, s in samplers.items():
        for rule in ("each", "joint"):
            for t in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95):
                measure(f"learned-{k}" + ("-joint" if rule == "joint" else ""), t, LearnedPolicy(s, t, rule))
    thr = [(r["tpf"], r["agreement"]) for r in rows if r["policy"] == "threshold"]
    base, base_hull = envelope(thr), envelope(thr, hull=True)
    print(f"tiny arithmetic model, {len(held_p)} held-out prompts x {N} tokens, block {K}")
    print("| policy | threshold | TPF | agreement with AR | vs threshold curve | vs threshold hull |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        th = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        cells = []
        for key, f in (("vs_threshold", base), ("vs_threshold_hull", base_hull)):
            d = f(r["tpf"])
            r[key] = None if d is None else r["agreement"] - d
            cells.append("-" if d is None or r["policy"] == "threshold" else f"{r['agreement'] - d:+.3f}")
        print(f"| {r['policy']} | {th} | {r['tpf']:.3f} | {r['agreement']:.3f} | {cells[0]} | {cells[1]} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, style in (("threshold", "o-"), ("threshold-joint", "o--"), ("learned-mlp", "s-"),
                        ("learned-mlp-joint", "s--"), ("learned-transformer", "^-"),
                        ("learned-transformer-joint", "^--")):
        pts = sorted((r["tpf"], r["agreement"]) for r in rows if r["policy"] == name)
        ax.plot(*zip(*pts), style, label=name)
    ax.plot([rows[0]["tpf"]], [rows[0]["agreement"]], "r*", markersize=14, label="oracle (speed of light)")
    ax.set_xlabel("tokens per forward (prefill included)")
    ax.set_ylabel("agreement with AR greedy output")
    ax.set_title(f"tiny arithmetic model: unmasking policies, block {K}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
