"""Feature drafters against the draft adapter on held-out prompts: acceptance, tokens per forward, tok/s.

    python scripts/feature_drafter_eval.py DRAFTER_DIR [DRAFTER_DIR ...] [--model smollm2] [--prompts 2] [--offset 0]
        [--max-new-tokens 96] [--feature 4:0,6:12,8:16,8:12:full] [--adapter 8:12] [--dtype bfloat16]

Every prompt runs AR, then the adapter configurations, then each drafter's configurations, back to
back (interleaved, so the ratios compare like with like on a shared machine); each run is checked
against AR's tokens; `fd/cyc` is the feature drafter's forwards per cycle. Prompts: the held-out
benchmark suites (coding: HumanEval + MBPP test; math: GSM8K test; chat: the project's held-out chat
set), as `trimode bench` builds them; `--offset 5` skips the benchmark's own first 5 per category.
"""

from __future__ import annotations

import argparse
import os
import time


def _specs(s: str) -> list[tuple[int, int, bool, bool, int, float]]:
    """k[:tree nodes[:nl][:full][:bN][:pX]] (nl: without the prompt-lookup path; full: trees drafted to
    full depth, without the early stop once no deeper node can enter the tree; bN: N children per node;
    pX: tree_min_prob X, stop drafting deeper once no frontier path is that likely)."""
    out = []
    for part in filter(None, s.split(",")):
        bits = part.split(":")
        branch = next((int(b[1:]) for b in bits[2:] if b.startswith("b") and b[1:].isdigit()), 3)
        pmin = next((float(b[1:]) for b in bits[2:] if b.startswith("p")), 0.0)
        out.append((int(bits[0]), int(bits[1]) if len(bits) > 1 and bits[1] else 0, "nl" not in bits[2:],
                    "full" not in bits[2:], branch, pmin))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("drafters", nargs="*", help="feature drafter directories ('shipped': the model's own; "
                   "a '+int8' suffix: that drafter on int8 packed kernels)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=2, help="per category")
    p.add_argument("--offset", type=int, default=0,
                   help="skip the first N prompts of each category (5: prompts the 15-prompt benchmark does not use)")
    p.add_argument("--categories", default="coding,math,chat",
                   help="benchmark categories; chat-train: training chat prompts (the generalisation gap)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--feature", default="4:0,6:12,8:16",
                   help="k:tree nodes[:nl][:full][:bN] of the feature drafter, comma-separated (nl: no lookup "
                   "path; full: no early stop; bN: N children per node, default 3)")
    p.add_argument("--adapter", default="8:12", help="k:tree nodes of the draft adapter ('' for none)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    import trimode
    from trimode.bench.suites import build_suites
    from trimode.checkpoint import load_model
    from trimode.feature_drafter import load_feature_drafter
    from trimode.models import for_inference, resolve_model
    from trimode.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    model = for_inference(load_model(path, dtype=getattr(torch, args.dtype)))
    drafters = {}
    for d in args.drafters:
        src, int8 = (d[: -len("+int8")], True) if d.endswith("+int8") else (d, False)
        drafters[d] = (model.feature_drafter if src == "shipped"
                       else load_feature_drafter(src, model.config, dtype=model.dtype))
        if drafters[d] is None:
            raise SystemExit(f"{d}: the model ships no feature drafter")
        if int8:  # the same drafter on int8 packed kernels (FeatureDrafter.pack_int8), a copy
            import copy

            drafters[d] = copy.deepcopy(drafters[d]).pack_int8()
    cats = args.categories.split(",")
    suites = build_suites(tok, categories=[c for c in cats if c != "chat-train"], n=args.offset + args.prompts,
                          chat=True, model_dir=path)
    suites = {c: ps[args.offset:] for c, ps in suites.items() if ps[args.offset:]}
    if "chat-train" in cats:  # training chat prompts (seen in drafter training): the generalisation gap
        from trimode.bench.suites import Prompt
        from trimode.prompts import advice_train_texts, chat_train_texts

        n = args.prompts
        texts = chat_train_texts()[::60][: (n + 1) // 2] + advice_train_texts()[::50][: n // 2]
        suites["chat-train"] = [Prompt("chat-train", f"chat-train/{i}", t, tuple(tok.encode(
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))))
            for i, t in enumerate(texts)]
    if not suites:
        raise SystemExit(f"no prompts left after --offset {args.offset}")
    from trimode.decode.featdraft import FeatureDraftDecoder

    settled = FeatureDraftDecoder.__dict__["_settled"]  # the staticmethod itself
    configs = [("adapter", k, n, None, True, True, b, 0.0) for k, n, _, _, b, _ in _specs(args.adapter)]
    configs += [("feature", k, n, d, lk, stop, b, pm) for d in drafters
                for k, n, lk, stop, b, pm in _specs(args.feature)]
    AR = ("ar", 1, 0, None, True, True, 3, 0.0)
    stats = {c: {"tok": 0, "s": 0.0, "nfe": 0, "acc": [], "same": 0, "calls": 0} for c in [AR] + configs}
    calls = [0]  # feature drafter forwards (the feed of the accepted pairs and one per drafted depth)
    classes = {type(x) for x in drafters.values()}
    for cls in classes:  # once per class: drafters of one class share its forward
        real = cls.forward

        def counted(self, *a, real=real, **k):
            calls[0] += 1
            return real(self, *a, **k)

        cls.forward = counted
    by_cat = {(c, cat): {"tok": 0, "s": 0.0, "nfe": 0, "acc": []} for c in [AR] + configs for cat in suites}
    eos = tok.eos_id
    n_prompts = 0
    t_start = time.time()
    for cat, prompts in suites.items():
        for pr in prompts:
            ids = list(pr.tokens)
            t0 = time.perf_counter()
            ar = trimode.generate(model, [ids], mode="ar", max_new_tokens=args.max_new_tokens, eos_id=eos)[0]
            for st in (stats[AR], by_cat[AR, cat]):
                st["s"] += time.perf_counter() - t0
                st["tok"] += len(ar.tokens)
                st["nfe"] += ar.nfe
            n_prompts += 1
            for c in configs:
                kind, k, n, d, lk, stop, b, pm = c
                if d is not None:
                    model.set_feature_drafter(drafters[d])
                FeatureDraftDecoder._settled = settled if stop else staticmethod(lambda *a: False)
                calls[0] = 0
                t0 = time.perf_counter()
                g = trimode.generate(model, [ids], mode="linear", max_new_tokens=args.max_new_tokens, eos_id=eos,
                                     block_len=k, tree_nodes=n, drafter=kind, lookup=lk, tree_branch=b,
                                     tree_min_prob=pm)[0]
                dt = time.perf_counter() - t0
                for st in (stats[c], by_cat[c, cat]):
                    st["s"] += dt
                    st["tok"] += len(g.tokens)
                    st["nfe"] += g.nfe
                by_cat[c, cat]["acc"] += g.stats["acceptance"]
                st = stats[c]
                st["calls"] += calls[0]
                st["acc"] += g.stats["acceptance"]
                st["same"] += g.tokens == ar.tokens
            print(f"  {cat} prompt done ({time.time() - t_start:.0f}s)", flush=True)
    FeatureDraftDecoder._settled = settled
    base = stats[AR]
    ar_tps = base["tok"] / base["s"]
    print(f"load average {os.getloadavg()[0]:.2f}; {n_prompts} prompts x {args.max_new_tokens} tokens, "
          f"{args.dtype}, {args.threads} thread(s)")
    cats = list(suites)
    print(f"{'config':<40} {'tok/fwd':>7} {'accept':>6} {'fd/cyc':>6} {'tok/s':>7} {'vs ar':>6} {'same as ar':>10}   "
          + "  ".join(f"{c} tok/fwd, vs ar" for c in cats))
    for c, st in stats.items():
        kind, k, n, d, lk, stop, b, pm = c
        name = "ar" if kind == "ar" else (f"{kind} k={k}" + (f" tree{n}" if n else "")
                                          + (f" b{b}" if n and b != 3 else "")
                                          + (f" p{pm:g}" if n and pm else "")
                                          + ("" if lk else " no-lookup")
                                          + ("" if stop or not n else " full-depth")
                                          + (f" [{os.path.basename(d.rstrip('/'))}]" if d else ""))
        acc = f"{sum(st['acc']) / len(st['acc']):.2f}" if st["acc"] else "-"
        tps = st["tok"] / st["s"]
        per = []
        for cat in cats:
            x, a = by_cat[c, cat], by_cat[AR, cat]
            per.append(f"{x['tok'] / max(x['nfe'], 1):.2f}, {(x['tok'] / x['s']) / (a['tok'] / a['s']):.2f}x")
        cyc = f"{st['calls'] / len(st['acc']):.2f}" if st["acc"] and kind == "feature" else "-"
        print(f"{name:<40} {st['tok'] / st['nfe']:>7.2f} {acc:>6} {cyc:>6} {tps:>7.1f} {tps / ar_tps:>5.2f}x "
              f"{st['same'] if kind != 'ar' else '-':>6}/{n_prompts}   " + "  ".join(per))
    print("share of cycles accepting >= 1 draft, and >= 2 given >= 1, per category:")
    for c in configs:
        per = []
        for cat in cats:
            acc = by_cat[c, cat]["acc"] if cat in suites else []
            if acc:
                one, two = sum(a >= 2 for a in acc), sum(a >= 3 for a in acc)
                per.append(f"{cat} {one / len(acc):.2f} / {two / max(one, 1):.2f}")
        print(f"  {c[0]} k={c[1]} tree{c[2]}" + (f" p{c[7]:g}" if c[7] else "") + ": " + "  ".join(per))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
