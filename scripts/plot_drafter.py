"""Plot a `trimode train-drafter` run: loss and expected accepted drafts per training block, per K.

    python scripts/plot_drafter.py runs/smol/draft_dream/training.json --out docs/smollm2_drafter.png
"""

from __future__ import annotations

import argparse
import json


def smooth(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="training.json written next to the adapter")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=10)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = json.load(open(args.log))["history"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for K in sorted({h["K"] for h in hist}):
        hs = [h for h in hist if h["K"] == K]
        steps = [h["step"] for h in hs]
        a.plot(steps, smooth([h["loss"] for h in hs], args.window), label=f"K={K}")
        b.plot(steps, smooth([h["accepted"] for h in hs], args.window), label=f"K={K}")
    a.set(xlabel="step", ylabel="loss (CE + 0.5 KL)", title="drafter loss")
    b.set(xlabel="step", ylabel="accepted drafts per block", title="expected accepted drafts (training blocks)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
