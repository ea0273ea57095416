"""`trimode plot LOG.jsonl [--out FILE.png] [--title TEXT]`: loss curves of a training log.

Training records carry `ar_loss`, `diff_loss` and `lr`; evaluation records carry `val_ar_loss` and
`val_diff_loss`. Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = "usage: trimode plot LOG.jsonl [--out FILE.png] [--title TEXT]"


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSONL log; ValueError naming the bad line."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read log {str(p)!r}: {e}") from None
    recs = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{p}:{n}: not a JSON line") from None
    if not any("ar_loss" in r for r in recs):
        raise ValueError(f"{p} holds no training records (no 'ar_loss' field)")
    return recs


def series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def plot(recs: list[dict], out: str | Path, *, title: str | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ValueError("plotting needs matplotlib: pip install 'trimode[plot]'") from None
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.5), height_ratios=[3, 1], sharex=True)
    for key, label, style in (("ar_loss", "train AR", "-"), ("diff_loss", "train diffusion", "-"),
                              ("val_ar_loss", "val AR", "o--"), ("val_diff_loss", "val diffusion", "s--")):
        x, y = series(recs, key)
        if x:
            ax.plot(x, y, style, label=label, lw=1.2, ms=4)
    ax.set_ylabel("loss (nats / token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title)
    x, y = series(recs, "lr")
    ax_lr.plot(x, y, color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    log, out, title = None, None, None
    i = 0
    while i < len(argv):
        if argv[i] in ("--out", "--title") and i + 1 < len(argv):
            if argv[i] == "--out":
                out = argv[i + 1]
            else:
                title = argv[i + 1]
            i += 2
        elif log is None and not argv[i].startswith("--"):
            log, i = argv[i], i + 1
        else:
            print(f"trimode plot: error: unexpected argument {argv[i]!r}\n{USAGE}", file=sys.stderr)
            return 2
    if log is None:
        print(f"trimode plot: error: no log given\n{USAGE}", file=sys.stderr)
        return 2
    try:
        path = plot(read_log(log), out or Path(log).with_suffix(".png"), title=title)
    except ValueError as e:
        print(f"trimode plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
