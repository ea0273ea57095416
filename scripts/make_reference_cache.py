"""A training cache of reference answers for the feature drafter: chat prompts from the training splits
followed by the datasets' own answers (not the model's), in the format of `trimode train-drafter
--data-cache` (tokens, valid, lengths, prompt_lengths).

    python scripts/make_reference_cache.py --out runs/smol/reference.pt [--model smollm2] [--gsm8k 2400] [--mbpp 464]

The feature drafter learns the verifier's next-token distribution at every position of any text
(`trimode train-feature-drafter` scores soft targets from the verifier's own features), so text the
model did not write still teaches it; it is cheap where self-distilled continuations cost AR
generation. Sources: GSM8K train (question -> worked answer, calculator annotations <<...>> removed)
and MBPP tasks 511-974 (task -> code in a fenced block); the held-out sets (GSM8K test, MBPP 11-510,
HumanEval, the held-out chat prompts) are never read.
"""

from __future__ import annotations

import argparse
import json
import random
import re


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="GSM8K / MBPP directory (default: trimode.prompts.data_root)")
    p.add_argument("--gsm8k", type=int, default=2400, help="GSM8K train pairs (at most)")
    p.add_argument("--mbpp", type=int, default=464, help="MBPP 511-974 pairs (at most)")
    p.add_argument("--max-len", type=int, default=320)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from trimode.models import resolve_model
    from trimode.prompts import data_root
    from trimode.tokenizer import load_tokenizer

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    root = data_root(args.data)
    pairs = []
    rows = [json.loads(line) for line in open(root / "gsm8k" / "train.jsonl")]
    random.Random(args.seed).shuffle(rows)
    for r in rows[: args.gsm8k]:
        pairs.append((r["question"], re.sub(r"<<[^>]*>>", "", r["answer"])))
    rows = [json.loads(line) for line in open(root / "mbpp" / "mbpp.jsonl")]
    rows = [r for r in rows if 511 <= r["task_id"] <= 974]
    random.Random(args.seed).shuffle(rows)
    for r in rows[: args.mbpp]:
        q = f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}"
        pairs.append((q, "```python\n" + r["code"].replace("\r\n", "\n").strip() + "\n```"))
    seqs, plens = [], []
    for q, a in pairs:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
        ids = prompt + tok.encode(a) + ([tok.eos_id] if tok.eos_id is not None else [])
        if len(ids) <= args.max_len:
            seqs.append(ids)
            plens.append(len(prompt))
    L = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    valid = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, plens)):
        tokens[i, : len(s)] = torch.tensor(s)
        valid[i, n: len(s)] = True
    torch.save({"tokens": tokens, "valid": valid, "lengths": torch.tensor([len(s) for s in seqs]),
                "prompt_lengths": torch.tensor(plens)}, args.out)
    print(f"wrote {args.out}: {len(seqs)} sequences, {int(valid.sum()):,} answer tokens, "
          f"{sum(len(s) for s in seqs):,} tokens in all (max length {L})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
