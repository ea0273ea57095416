"""Sampled (or greedy) continuations of the chat training prompts, as a self-distillation cache for
`trimode train-feature-drafter --data-cache`.

    python scripts/sampled_continuations.py --out runs/smol/chat_sampled.pt --temperature 0.8 --top-p 0.95

The feature drafter learns the verifier's next-token distribution at every position (soft targets from
the verifier's own features), so a continuation need not be the greedy one to teach it: sampling the
same prompts again gives new contexts in the model's own style at the cost of AR generation only. The
prompts are `trimode.prompts.chat_train_texts` and `advice_train_texts` (the held-out chat set shares no
wording or topic with them; tests/test_train_data.py), chat-templated; prompt i is sampled with seed
`--seed` + i.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the cache to write (.pt)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sources", default="chat,advice",
                   help="comma-separated train sources (trimode.train.distill) and jsonl files of {\"prompt\": ...}")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy continuations")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.temperature < 0:
        raise SystemExit("--temperature must be >= 0 (0: greedy)")

    import torch

    from trimode.checkpoint import load_model
    from trimode.models import resolve_model
    from trimode.tokenizer import load_tokenizer
    from trimode.train.distill import (
        TRAIN_SOURCES,
        ar_continuations,
        category_texts,
        chat_prompts,
        read_prompts_jsonl,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    sources = [s for s in args.sources.split(",") if s]
    bad = [s for s in sources if s not in TRAIN_SOURCES and not s.endswith(".jsonl")]
    if bad:
        raise SystemExit(f"unknown source(s) {bad}; choose from {TRAIN_SOURCES} or pass a .jsonl file")
    d = resolve_model(args.model)
    tok = load_tokenizer(d)
    model = load_model(d, dtype=torch.bfloat16).eval()
    texts: list[str] = []
    for s in sources:
        if s.endswith(".jsonl"):
            texts += read_prompts_jsonl(s)
        else:
            texts += category_texts(s, split="train")
    prompts = chat_prompts(tok, texts, n=len(texts), seed=args.seed)[: args.limit]
    c = model.config
    t0 = time.perf_counter()
    seqs = ar_continuations(model, prompts, new=args.max_new_tokens, eos_id=c.eos_token_id, batch=args.batch,
                            pad_id=c.pad_token_id if c.pad_token_id is not None else 0,
                            log=lambda m: print(m, flush=True),
                            **({"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
                               if args.temperature > 0 else {}))
    out = dict(vars(seqs))
    out["meta"] = {"sources": sources, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                   "max_new_tokens": args.max_new_tokens, "model": args.model}
    torch.save(out, args.out)
    print(f"wrote {len(prompts)} sequences to {args.out} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
