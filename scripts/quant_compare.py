"""Quantized weights against unquantized ones on SmolLM2, every mode, one run, interleaved.

    python scripts/quant_compare.py [--model smollm2] [--variants float32,int8,int4] [--prompts 2]
                                    [--max-new-tokens 64] [--out docs/quantization.json]

Per prompt (held-out coding, math and chat requests in the chat template, greedy, batch 1, one
thread), every variant x mode runs back to back, so machine noise hits all alike. Prints per variant
and mode: tokens/s, the speed-up against the first variant's AR, tokens per forward, mean acceptance,
whether every output equals the same variant's AR; per variant: AR token agreement with the first
variant's AR (positions equal up to the first difference, and overall) and the held-out loss (mean
next-token cross-entropy of the prompt texts, teacher-forced).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def load(path, variant):
    from trimode.checkpoint import load_model
    from trimode.dtypes import parse_dtype
    from trimode.models import for_inference

    if variant in ("int8", "int4"):
        return for_inference(load_model(path, dtype=torch.float32, quantize=variant))
    return for_inference(load_model(path, dtype=parse_dtype(variant)))


def heldout_loss(model, prompts) -> float:
    total, n = 0.0, 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([list(p.tokens)])
            logits = model(ids).float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total, n = total + nll.item(), n + ids.shape[1] - 1
    return total / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--variants", default="float32,int8,int4")
    ap.add_argument("--modes", default="ar,linear,quadratic")
    ap.add_argument("--block-lens", default="linear=4,quadratic=3")
    ap.add_argument("--prompts", type=int, default=2, help="per category (coding, math, chat)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import trimode
    from trimode.bench.suites import build_suites
    from trimode.models import resolve_model
    from trimode.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    suites = build_suites(tok, n=args.prompts, categories=["coding", "math", "chat"], chat=True)
    prompts = [p for ps in suites.values() for p in ps]
    variants = args.variants.split(",")
    modes = args.modes.split(",")
    block_lens = dict(kv.split("=") for kv in args.block_lens.split(",")) if args.block_lens else {}
    models = {v: load(path, v) for v in variants}
    load_avg = os.getloadavg()
    eos = tok.eos_id
    stop = [t for t in (tok.token_to_id("<|im_end|>"),) if t is not None]
    res = {(v, m): {"tokens": 0, "seconds": 0.0, "forwards": 0, "acc": [], "same_as_ar": 0} for v in variants
           for m in modes}
    ar_tokens: dict[str, list[list[int]]] = {v: [] for v in variants}
    for p in prompts:
        for v in variants:
            for m in modes:
                kw = {} if m == "ar" else {"block_len": int(block_lens.get(m, 4))}
                t0 = time.perf_counter()
                g = trimode.generate(models[v], [list(p.tokens)], mode=m, max_new_tokens=args.max_new_tokens,
                                     eos_id=eos, stop=stop, **kw)[0]
                dt = time.perf_counter() - t0
                r = res[(v, m)]
                r["tokens"] += len(g.tokens)
                r["seconds"] += dt
                r["forwards"] += g.nfe
                acc = g.stats.get("acceptance")
                if acc:
                    r["acc"].extend(acc if isinstance(acc, list) else [acc])
                if m == "ar":
                    ar_tokens[v].append(g.tokens)
                    r["same_as_ar"] += 1
                else:
                    r["same_as_ar"] += int(g.tokens == ar_tokens[v][-1])
    base = variants[0]
    base_tps = res[(base, "ar")]["tokens"] / res[(base, "ar")]["seconds"]
    table = []
    for v in variants:
        agree_prefix, agree_all, total = 0, 0, 0
        for a, b in zip(ar_tokens[v], ar_tokens[base]):
            n = min(len(a), len(b))
            k = next((i for i in range(n) if a[i] != b[i]), n)
            agree_prefix += k
            agree_all += sum(x == y for x, y in zip(a, b))
            total += max(len(b), 1)
        loss = heldout_loss(models[v], prompts)
        for m in modes:
            r = res[(v, m)]
            tps = r["tokens"] / r["seconds"]
            table.append({"variant": v, "mode": m, "tok_s": round(tps, 2), "vs_base_ar": round(tps / base_tps, 3),
                          "tokens_per_forward": round(r["tokens"] / max(r["forwards"], 1), 3),
                          "acceptance": round(sum(r["acc"]) / len(r["acc"]), 3) if r["acc"] else None,
                          "identical_to_own_ar": f"{r['same_as_ar']}/{len(prompts)}",
                          "ar_agreement_prefix": round(agree_prefix / total, 3),
                          "ar_agreement_positions": round(agree_all / total, 3), "heldout_loss": round(loss, 4)})
    print(f"{args.model}, {len(prompts)} prompts x {args.max_new_tokens} tokens, 1 thread, load average "
          f"{load_avg[0]:.2f}; CPU {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'variant':>8} {'mode':>9} {'tok/s':>7} {'vs ' + base + ' ar':>13} {'TPF':>5} {'acc':>5} "
          f"{'same as own ar':>14} {'ar agree (prefix/pos)':>22} {'heldout loss':>12}")
    for row in table:
        acc = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
        print(f"{row['variant']:>8} {row['mode']:>9} {row['tok_s']:>7.2f} {row['vs_base_ar']:>12.2f}x "
              f"{row['tokens_per_forward']:>5.2f} {acc:>5} {row['identical_to_own_ar']:>14} "
              f"{row['ar_agreement_prefix']:>10.3f} / {row['ar_agreement_positions']:.3f} {row['heldout_loss']:>12.4f}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "prompts": len(prompts),
                                        "max_new_tokens": args.max_new_tokens, "load_average": load_avg[0],
                                        "cpu": torch.backends.cpu.get_cpu_capability(), "rows": table}, indent=1)
                            + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
