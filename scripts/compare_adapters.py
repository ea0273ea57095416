"""Draft adapters side by side on held-out prompts: acceptance, tokens per forward and tok/s, interleaved.

    python scripts/compare_adapters.py ADAPTER_DIR [ADAPTER_DIR ...] [--model smollm2] [--prompts 3]
        [--max-new-tokens 64] [--modes linear:8:12,quadratic:3] [--dtype bfloat16]
    python scripts/compare_adapters.py shipped shipped:full-vocab     # the draft vocabulary on and off

Each adapter is loaded onto its own copy of the model (base weights shared on disk, not in memory);
"shipped" names the adapter shipped with the model. Every prompt runs AR once, then each
(adapter, mode) back to back, so the ratios compare like with like on a shared machine. Prompts are
the held-out benchmark suites (coding: HumanEval + MBPP test; math: GSM8K test; chat: the project's
held-out chat set), as `trimode bench` builds them.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="+", help="adapter dirs (PEFT), or 'shipped'; ADAPTER:full-vocab drafts over "
                                               "the whole vocabulary even where the adapter has a draft_vocab.json")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=3, help="per category")
    p.add_argument("--categories", default="coding,math,chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--modes", default="linear:8:12,quadratic:3", help="mode:k[:tree nodes], comma-separated")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    import trimode
    from trimode.bench.suites import build_suites
    from trimode.checkpoint import load_adapter, load_model
    from trimode.models import for_inference, resolve_model
    from trimode.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    models = {}
    for a in args.adapters:
        m = load_model(path, dtype=args.dtype)
        where, _, opt = a.partition(":")
        if opt not in ("", "full-vocab"):
            p.error(f"{a}: the only option after ':' is full-vocab")
        if where != "shipped":
            m.set_draft_vocab(None)  # the adapter's own draft vocabulary, if it has one, comes with it
            load_adapter(m, where, name="draft")
        models[a] = for_inference(m, draft_vocab=opt != "full-vocab")
    suites = build_suites(tok, categories=args.categories.split(","), n=args.prompts, chat=True)
    modes = []
    for spec in args.modes.split(","):
        parts = spec.split(":")
        modes.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 0))
    eos = tok.eos_id
    acc: dict[tuple, list] = {}
    base = next(iter(models.values()))
    for cat, prompts in suites.items():
        for pr in prompts:
            ids = list(pr.tokens)
            t0 = time.perf_counter()
            ar = trimode.generate(base, [ids], mode="ar", max_new_tokens=args.max_new_tokens, eos_id=eos)[0]
            t_ar = time.perf_counter() - t0
            for a, m in models.items():
                for mode, k, nodes in modes:
                    t0 = time.perf_counter()
                    g = trimode.generate(m, [ids], mode=mode, max_new_tokens=args.max_new_tokens, block_len=k,
                                         tree_nodes=nodes, eos_id=eos)[0]
                    dt = time.perf_counter() - t0
                    acc.setdefault((a, mode, k, nodes), []).append(
                        (cat, len(g.tokens), g.stats["nfe"], g.stats["mean_acceptance"] or 0.0, dt,
                         len(ar.tokens) / t_ar, g.tokens == ar.tokens))
    print(f"{'adapter':<40} {'config':<18} {'tok/fwd':>7} {'accept':>7} {'vs ar':>6} {'same':>5}")
    for (a, mode, k, nodes), rs in acc.items():
        toks = sum(r[1] for r in rs)
        nfe = sum(r[2] for r in rs)
        mean_acc = sum(r[3] for r in rs) / len(rs)
        speed = sum(r[1] for r in rs) / sum(r[4] for r in rs)
        ar_speed = sum(r[5] for r in rs) / len(rs)
        same = sum(r[6] for r in rs)
        cfg = f"{mode} k={k}" + (f" tree{nodes}" if nodes else "")
        print(f"{a[-40:]:<40} {cfg:<18} {toks / nfe:7.2f} {mean_acc:7.2f} {speed / ar_speed:6.2f} {same:>2}/{len(rs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
