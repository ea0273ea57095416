"""Build a draft vocabulary (draft_vocab.json) for a model's draft adapter and report its coverage.

    python scripts/make_draft_vocab.py --model smollm2 --data-cache runs/smol/distill2400x96.pt \
        --sizes 8192,16384,24576 --size 16384 --out trimode/assets/smollm2/adapter [--heldout 5]

Ranking (`trimode.draftvocab`): an equal-weight mixture of the token frequencies of the self-distilled
targets in --data-cache (the model's own greedy continuations of training prompts, as `trimode
train-drafter --data-cache` writes them), the training splits (GSM8K train, MBPP 511-974, the chat
training prompts) and the Python standard library. With --heldout N the model's AR greedy outputs on
N held-out prompts per category (HumanEval + MBPP test, GSM8K test, the held-out chat set; never used
for the ranking) are generated and each size's coverage of them is printed: the share of tokens a
draft could still propose. --size picks the one written to --out.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-cache", required=True, help="self-distillation cache (.pt) of train-drafter")
    p.add_argument("--data", default=None, help="GSM8K / MBPP directory (default: trimode.prompts.data_root)")
    p.add_argument("--sizes", default="8192,16384,24576", help="sizes whose coverage is reported")
    p.add_argument("--size", type=int, default=None, help="the size written to --out")
    p.add_argument("--out", default=None, help="adapter directory to write draft_vocab.json into")
    p.add_argument("--heldout", type=int, default=0, help="held-out prompts per category for the coverage report")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args(argv)
    if (args.size is None) != (args.out is None):
        p.error("--size and --out go together")

    import torch

    import trimode
    from trimode import draftvocab
    from trimode.checkpoint import load_model
    from trimode.models import resolve_model
    from trimode.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    model = load_model(path, dtype=torch.bfloat16)
    c = model.config
    V = c.vocab_size
    seqs = torch.load(args.data_cache)
    seen = seqs["tokens"][seqs["valid"].bool()].reshape(-1)
    t0 = time.perf_counter()
    corpus = draftvocab.corpus_counts(tok, V, data=args.data, log=print)
    print(f"counted: {seen.numel():,} self-distilled target tokens; "
          + "; ".join(f"{k} {int(v.sum()):,} tokens" for k, v in corpus.items())
          + f" ({time.perf_counter() - t0:.0f} s)")
    score = draftvocab.mixture(torch.bincount(seen, minlength=V), *corpus.values())
    held: dict[str, torch.Tensor] = {}
    own: dict[str, torch.Tensor] = {}
    if args.heldout:
        from trimode.bench.suites import build_suites

        suites = build_suites(tok, categories=["coding", "math", "chat"], n=args.heldout, chat=True)
        for cat, prompts in suites.items():
            outs = [trimode.generate(model, [list(pr.tokens)], mode="ar", max_new_tokens=args.max_new_tokens,
                                     eos_id=tok.eos_id)[0].tokens for pr in prompts]
            held[cat] = torch.tensor([t for o in outs for t in o])
            # What a decoder adds to the vocabulary (Decoder.draft_head): the prompt and the output so far.
            own[cat] = torch.tensor([t in set(pr.tokens) or t in o[:i]
                                     for pr, o in zip(prompts, outs) for i, t in enumerate(o)])
    sizes = sorted({int(s) for s in args.sizes.split(",")} | ({args.size} if args.size else set()))
    report = {}
    print("coverage: share of tokens a draft can propose (in brackets: adding the prompt's and the output's own "
          "tokens, as decoders do)")
    print(f"{'size':>6} {'training targets':>16} " + " ".join(f"{'held-out ' + k:>18}" for k in held))
    for n in sizes:
        ids = draftvocab.from_counts(score, n, keep=[c.eos_token_id], drop=[c.mask_token_id])
        row = {"training_targets": round(draftvocab.coverage(ids, seen, V), 5)}
        row.update({f"heldout_{k}": round(draftvocab.coverage(ids, v, V), 5) for k, v in held.items()})
        inside = torch.zeros(V, dtype=torch.bool)
        inside[ids] = True
        row.update({f"heldout_{k}_with_own_tokens": round(float((inside[v] | own[k]).float().mean()), 5)
                    for k, v in held.items()})
        report[n] = row
        print(f"{n:>6} {row['training_targets']:>16.4f} "
              + " ".join(f"{row[f'heldout_{k}']:>9.4f} ({row[f'heldout_{k}_with_own_tokens']:.4f})" for k in held))
    if args.out:
        ids = draftvocab.from_counts(score, args.size, keep=[c.eos_token_id], drop=[c.mask_token_id])
        out = draftvocab.write(
            args.out, ids, vocab_size=V,
            source={"ranking": "equal-weight mixture of token frequencies (trimode.draftvocab.mixture)",
                    "self_distilled_targets": int(seen.numel()),
                    **{k: int(v.sum()) for k, v in corpus.items()}},
            coverage=report[args.size],
            command="python scripts/make_draft_vocab.py " + " ".join(argv if argv is not None else __import__(
                "sys").argv[1:]))
        print(f"wrote {out} ({ids.numel()} ids)")
        print(json.dumps(report[args.size]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
