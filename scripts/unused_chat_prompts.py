"""The chat training prompts (`trimode.prompts.chat_train_texts`) that a self-distillation cache does not
hold yet, as a jsonl of {"prompt": ...} lines for `trimode train-drafter --prompts FILE.jsonl`.

    python scripts/unused_chat_prompts.py --data-cache runs/smol/distill2400x96.pt --out runs/smol/chat_unused.jsonl

`--prompts chat --n-prompts N` draws a seeded sample of the chat set mixed with the other sources, so a
first cache holds only part of it; this lists the rest (a prompt counts as used when its chat-templated
token ids open one of the cache's sequences).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-cache", required=True, help="a train-drafter --data-cache (.pt)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2", help="its tokenizer and chat template")
    args = p.parse_args(argv)

    import torch

    from trimode.models import resolve_model
    from trimode.prompts import chat_train_texts
    from trimode.tokenizer import load_tokenizer
    from trimode.train.distill import write_prompts_jsonl

    tok = load_tokenizer(resolve_model(args.model))
    d = torch.load(args.data_cache, weights_only=False)
    if not isinstance(d, dict) or "tokens" not in d or "prompt_lengths" not in d:
        raise SystemExit(f"{args.data_cache}: not a train-drafter data cache (tokens, prompt_lengths)")
    used = {tuple(d["tokens"][i, : int(n)].tolist()) for i, n in enumerate(d["prompt_lengths"])}
    texts = chat_train_texts()
    rest = [t for t in texts
            if tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": t}],
                                                        add_generation_prompt=True))) not in used]
    write_prompts_jsonl(args.out, rest)
    print(f"{len(rest)} of {len(texts)} chat training prompts are not in {args.data_cache}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
