"""Where bf16 speculative decoding leaves bf16 AR, and whether each divergence is a numerical near-tie.

    python scripts/bf16_divergence.py --model smollm2 --modes linear:8,quadratic:3 --prompts 6 \
        --categories coding,math,chat --max-new-tokens 96

For every prompt (batch 1, greedy): AR in bfloat16, each speculative mode in bfloat16, and AR in float32.
At the first position where a bf16 speculative output differs from bf16 AR, the script recomputes the
next-token logits of the shared prefix twice, in bf16 and in float32 (one full forward each), and
prints the bf16 top-2 gap (top-1 minus top-2 logit) next to the bf16 noise of those logits (max and
mean |bf16 - fp32| over the vocabulary at that position). A gap below the noise means the two
tokens are a near-tie that bf16 rounding alone can flip: a 1-token AR forward and a k-token verify
forward of the same prefix round differently. It also reports token agreement (share of AR's tokens
before the first difference) and the float32 result (identical or not) for the same prompts.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from trimode.bench.suites import build_suites
from trimode.checkpoint import load_model
from trimode.decode import generate
from trimode.models import resolve_model
from trimode.tokenizer import load_tokenizer


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--modes", default="linear:8,quadratic:3",
                   help="mode:block_len[:tree_nodes[:tree_min_prob]], comma-separated")
    p.add_argument("--prompts", type=int, default=6, help="per category")
    p.add_argument("--categories", default="coding,math,chat")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the per-prompt records here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    m16 = load_model(path, dtype=torch.bfloat16)
    m32 = load_model(path, dtype=torch.float32)
    suites = build_suites(tok, n=args.prompts, categories=args.categories.split(","), chat=True, model_dir=path)
    modes = [(f[0], int(f[1]), int(f[2]) if len(f) > 2 else 0, float(f[3]) if len(f) > 3 else 0.0)
             for f in (s.split(":") for s in args.modes.split(","))]
    eos = tok.eos_id
    recs = []
    print(f"model {path}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'prompt':<14} {'mode':<12} {'bf16 ident':>10} {'agree':>6} {'at':>4} {'gap':>7} {'noise max':>9} "
          f"{'noise mean':>10} {'near-tie':>8} {'fp32 ident':>10}")
    for cat, ps in suites.items():
        for pr in ps:
            ids = list(pr.tokens)
            ar16 = generate(m16, [ids], mode="ar", max_new_tokens=args.max_new_tokens, eos_id=eos)[0].tokens
            ar32 = generate(m32, [ids], mode="ar", max_new_tokens=args.max_new_tokens, eos_id=eos)[0].tokens
            for mode, k, tn, pm in modes:
                kw = {"mode": mode, "block_len": k, "tree_nodes": tn, "max_new_tokens": args.max_new_tokens,
                      "eos_id": eos, **({"tree_min_prob": pm} if mode == "linear" else {})}
                s16 = generate(m16, [ids], **kw)[0]
                s32 = generate(m32, [ids], **kw)[0]
                i = first_diff(s16.tokens, ar16)
                rec = {"source": pr.source, "category": cat, "mode": mode, "block_len": k, "tree_nodes": tn,
                       "tree_min_prob": pm,
                       "bf16_identical": i is None, "fp32_identical": s32.tokens == ar32,
                       "agreement": 1.0 if i is None else i / max(len(ar16), 1)}
                if i is not None and i < min(len(s16.tokens), len(ar16)):
                    ctx = torch.tensor([ids + ar16[:i]])
                    with torch.no_grad():
                        l16 = m16(ctx)[0, -1].float()
                        l32 = m32(ctx)[0, -1]
                    l16[m16.config.mask_token_id] = l32[m32.config.mask_token_id] = float("-inf")
                    top = l16.topk(2)
                    fin = torch.isfinite(l32)
                    diff = (l16 - l32)[fin].abs()
                    rec.update({"at": i, "ar_token": ar16[i], "spec_token": s16.tokens[i],
                                "gap": float(top.values[0] - top.values[1]),
                                "pair_is_top2": {ar16[i], s16.tokens[i]} == set(top.indices.tolist()),
                                "noise_max": float(diff.max()), "noise_mean": float(diff.mean())})
                    rec["near_tie"] = rec["gap"] <= rec["noise_max"]
                recs.append(rec)
                at = rec.get("at", "-")
                gap = f"{rec['gap']:.4f}" if "gap" in rec else "-"
                nm = f"{rec['noise_max']:.4f}" if "noise_max" in rec else "-"
                nmean = f"{rec['noise_mean']:.4f}" if "noise_mean" in rec else "-"
                tie = ("yes" if rec["near_tie"] else "NO") if "near_tie" in rec else "-"
                name = f"{mode}:{k}" + (f":t{tn}" if tn else "") + (f":p{pm:g}" if pm else "")
                print(f"{pr.source:<14} {name:<12} {str(rec['bf16_identical']):>10} "
                      f"{rec['agreement']:>6.2f} {at!s:>4} {gap:>7} {nm:>9} {nmean:>10} {tie:>8} "
                      f"{str(rec['fp32_identical']):>10}", flush=True)
    for mode, k, tn, pm in modes:
        rs = [r for r in recs if (r["mode"], r["block_len"], r["tree_nodes"], r["tree_min_prob"]) == (mode, k, tn, pm)]
        div = [r for r in rs if "gap" in r]
        name = f"{mode}:{k}" + (f":t{tn}" if tn else "") + (f":p{pm:g}" if pm else "")
        print(f"{name}: bf16 identical {sum(r['bf16_identical'] for r in rs)}/{len(rs)}, token agreement "
              f"{sum(r['agreement'] for r in rs) / len(rs):.3f}, divergences that are near-ties "
              f"{sum(r['near_tie'] for r in div)}/{len(div)}, fp32 identical {sum(r['fp32_identical'] for r in rs)}"
              f"/{len(rs)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
