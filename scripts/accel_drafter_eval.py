"""Drafter evaluation: acceptance length and tokens per forward of linear / quadratic self-speculation
with and without the "draft" LoRA, per prompt category, and whether greedy output equals AR.

    python scripts/accel_drafter_eval.py --model trimode/assets/bundled --adapter runs/accel/bundled_draft \
        --categories stdlib --prompts 16 --new 64 --block-lens 8
    python scripts/accel_drafter_eval.py --model runs/smollm2_joint --adapter runs/accel/smollm2_draft \
        --categories gsm8k,mbpp,humaneval --prompts 4 --new 32 --block-lens 8

Categories: `coding`, `math`, `domain`: the `trimode bench` suites (chat-formatted when the tokenizer
has a chat template; `domain` = held-out files); `stdlib` (windows of the held-out standard-library
files of a model with heldout_files.json), `gsm8k` (test questions), `mbpp` (tasks 11-510),
`humaneval` (chat prompts).
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from trimode import generate
from trimode.bench.suites import CATEGORIES, build_suites
from trimode.checkpoint import load_model
from trimode.peft import load_adapter
from trimode.tokenizer import load_tokenizer
from trimode.train.distill import category_texts, chat_prompts
from trimode.train.drafter import resolve_model_dir
from trimode.train.evaluate import encode_files, heldout_paths, make_prompts


def category_prompts(mdir: Path, tok, eos, category: str, n: int, prompt_len: int) -> list[list[int]]:
    if category in CATEGORIES:  # the `trimode bench` suites (chat-formatted when the tokenizer has a template)
        chat = tok.chat_template is not None and category != "domain"
        suite = build_suites(tok, n=n, categories=[category], chat=chat, model_dir=mdir, domain_prompt_len=prompt_len)
        return [list(q.tokens) for q in suite.get(category, [])]
    if category == "stdlib":
        docs = encode_files(tok, heldout_paths(mdir), eos)
        return make_prompts(docs, n, prompt_len)
    return chat_prompts(tok, category_texts(category, split="test"), n=n, seed=1234)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="PEFT adapter dir (default: the model's own 'draft')")
    p.add_argument("--categories", default="stdlib",
                   help="stdlib (held-out files), gsm8k/mbpp/humaneval (chat), or the bench suites coding/math/domain")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--block-lens", default="8")
    p.add_argument("--modes", default="linear,quadratic")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--adapter-only", action="store_true", help="skip the runs without the adapter")
    args = p.parse_args(argv)
    from trimode.models import resolve_model

    mdir = resolve_model(args.model) if args.model in ("smollm2", "bundled") else resolve_model_dir(args.model)
    model = load_model(mdir, dtype=getattr(torch, args.dtype))
    tok = load_tokenizer(mdir)
    if args.adapter:
        load_adapter(model, args.adapter, name="draft")
    assert "draft" in model.adapter_names(), "no draft adapter"
    eos = model.config.eos_token_id
    rows = []
    torch.set_grad_enabled(False)

    def run(prompts, **kw):
        out = []
        for s in range(0, len(prompts), args.batch):
            out += generate(model, prompts[s:s + args.batch], max_new_tokens=args.new, eos_id=eos, **kw)
        return out

    for cat in args.categories.split(","):
        prompts = category_prompts(mdir, tok, eos, cat, args.prompts, args.prompt_len)
        t0 = time.perf_counter()
        ref = [g.tokens for g in run(prompts, mode="ar")]
        print(f"[{cat}] {len(prompts)} prompts, AR reference {sum(map(len, ref))} tokens "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        for mode in args.modes.split(","):
            for k in (int(v) for v in args.block_lens.split(",")):
                for adapter in (("draft",) if args.adapter_only else (None, "draft")):
                    t0 = time.perf_counter()
                    gens = run(prompts, mode=mode, block_len=k, draft_adapter=adapter)
                    acc = [a for g in gens for a in g.stats["acceptance"]]
                    toks = sum(len(g.tokens) for g in gens)
                    nfe = sum(g.nfe for g in gens)
                    nfe_dec = sum(g.stats["nfe_decode"] for g in gens)
                    r = {"category": cat, "mode": mode, "block_len": k, "adapter": adapter is not None,
                         "prompts": len(prompts), "tokens": toks, "nfe": nfe,
                         "mean_acceptance": sum(acc) / len(acc), "tpf": toks / nfe, "tpf_decode": toks / nfe_dec,
                         "identical_to_ar": sum(g.tokens == x for g, x in zip(gens, ref)) / len(ref),
                         "seconds": time.perf_counter() - t0}
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    print("| category | mode | K | adapter | acceptance length | TPF | TPF (decode) | identical to AR |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['category']} | {r['mode']} | {r['block_len']} | {'on' if r['adapter'] else 'off'} | "
              f"{r['mean_acceptance']:.3f} | {r['tpf']:.3f} | {r['tpf_decode']:.3f} | "
              f"{r['identical_to_ar'] * 100:.0f}% |")
    print(json.dumps({"model": str(mdir), "adapter": args.adapter, "new": args.new, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
