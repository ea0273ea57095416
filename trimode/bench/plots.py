"""PNG plots of a benchmark result (matplotlib: the `plot` extra).

`write_plots(result, prefix)` writes `<prefix>_tpf.png` (tokens per forward per configuration and
category, the speed-of-light bars beside them), `<prefix>_tps_vs_block.png` (tokens/s against block
length, one line per mode, ar and the peers as horizontal lines), `<prefix>_acceptance.png`
(acceptance-length histograms of the speculative configurations) and, with a sweep,
`<prefix>_crossover.png`. Returns the paths written.
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'trimode[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict, prefix: str | Path) -> list[Path]:
    plt = _plt()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = result["runs"]
    title = result.get("model", "")

    # 1. tokens per forward by configuration and category (SOL bars hatched).
    cats = sorted({c for r in runs for c in r["categories"]})
    labels = [r["config"] for r in runs]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(cats))
    for j, cat in enumerate(cats):
        xs = [i + (j - (len(cats) - 1) / 2) * width for i in range(len(runs))]
        ys = [r["categories"].get(cat, {}).get("tpf", 0.0) for r in runs]
        bars = ax.bar(xs, ys, width, label=cat)
        for b, r in zip(bars, runs):
            if r["policy"] == "oracle":
                b.set_hatch("//")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("tokens per forward (prefill included)")
    ax.set_title(f"{title}: tokens per forward (hatched: speed-of-light oracle)", fontsize=9)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = prefix.with_name(prefix.name + "_tpf.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # 2. tokens/s vs block length.
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        if r["mode"] == "ar" or r.get("tokens_per_s") is None:
            continue
        name = "sol (oracle)" if r["policy"] == "oracle" else (
            f"diffusion t={r['threshold']}" if r["mode"] == "diffusion" else r["mode"])
        series.setdefault(name, []).append((r["block_len"], r["tokens_per_s"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=name)
    refs = [(r["config"], r["tokens_per_s"]) for r in runs if r["mode"] == "ar"]
    refs += [(p["name"], p["tokens_per_s"]) for p in result.get("peers", [])]
    for (name, v), ls in zip(refs, ("-", "--", ":", "-.")):
        ax.axhline(v, color="black", lw=1, ls=ls, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block length k")
    ax.set_ylabel("tokens/s (decode loop, wall clock)")
    ax.set_title(f"{title}: tokens/s vs block length, batch {result.get('batch_size', 1)}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = prefix.with_name(prefix.name + "_tps_vs_block.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # 3. acceptance-length histograms.
    spec = [r for r in runs if r.get("acceptance_hist")]
    if spec:
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(spec)
        for j, r in enumerate(spec):
            h = r["acceptance_hist"]
            tot = sum(h.values())
            xs = [int(a) + (j - (len(spec) - 1) / 2) * width for a in h]
            ax.bar(xs, [v / tot for v in h.values()], width, label=f"{r['config']} (mean {r['mean_acceptance']:.2f})")
        ax.set_xlabel("acceptance length (accepted drafts + bonus)")
        ax.set_ylabel("fraction of verifying forwards")
        ax.set_title(f"{title}: acceptance-length histogram", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = prefix.with_name(prefix.name + "_acceptance.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # 4. batch-size sweep.
    sw = result.get("sweep")
    if sw:
        fig, ax = plt.subplots(figsize=(6, 4))
        bs = [r["batch"] for r in sw["rows"]]
        ax.plot(bs, [r["ar_tokens_per_s"] for r in sw["rows"]], marker="o", label="ar")
        ax.plot(bs, [r["spec_tokens_per_s"] for r in sw["rows"]], marker="s", label=sw["spec"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}: crossover = {sw['auto_crossover']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = prefix.with_name(prefix.name + "_crossover.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
