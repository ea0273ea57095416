"""Chat training prompts written by the model itself (self-instruct style), as a jsonl of {"prompt": ...}
lines for `scripts/sampled_continuations.py --sources FILE.jsonl` or `trimode train-drafter --prompts`.

    python scripts/model_written_prompts.py --out runs/smol/chat_written.jsonl --per-topic 6

The templated chat sets (`trimode.prompts`) repeat a few dozen wordings; a drafter trained on them
meets new wordings at test time. Here the model is asked, for each training topic (the topics of
`chat_train_texts` and `advice_train_texts`, none of them a held-out topic) and each request kind,
to write one request a user might send, sampled; the answers are kept when they are one line of
reasonable length, are new, and are not a held-out prompt. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import re

KINDS = (
    "a question a curious person might ask about {t}",
    "a request for practical help with something related to {t}",
    "a request to write something short (a note, a story, a poem or a list) about {t}",
    "a question comparing two things related to {t}",
    "a question a student might ask a teacher about {t}",
    "a request for a simple explanation of how something related to {t} works",
)

ASSISTANT_OPENINGS = ("I'm ready", "I am ready", "I'd be happy", "I would be happy", "I can help", "I'll ", "Sure",
                      "Certainly", "Of course", "What a ", "Here is", "Here's")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--per-topic", type=int, default=6, help="requests asked for per topic (one per kind, cycling)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N topics (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.per_topic < 1 or args.temperature <= 0:
        raise SystemExit("--per-topic must be >= 1 and --temperature > 0")

    import torch

    import trimode
    from trimode.checkpoint import load_model
    from trimode.models import resolve_model
    from trimode.prompts import ADVICE_TOPICS, CHAT_HELDOUT, CREATIVE_TOPICS, TRAIN_TOPICS
    from trimode.tokenizer import load_tokenizer
    from trimode.train.distill import write_prompts_jsonl

    if args.threads:
        torch.set_num_threads(args.threads)
    d = resolve_model(args.model)
    tok = load_tokenizer(d)
    model = load_model(d, dtype=torch.bfloat16).eval()
    topics = list(dict.fromkeys(TRAIN_TOPICS + ADVICE_TOPICS + CREATIVE_TOPICS))[: args.limit]
    asks = []
    for i, t in enumerate(topics):
        for j in range(args.per_topic):
            kind = KINDS[(i + j) % len(KINDS)].format(t=t)
            asks.append(f"Write {kind}. Reply with the request only, in one sentence, as the user would type it.")
    held = {h.strip().lower() for h in CHAT_HELDOUT}
    seen: set[str] = set()
    out: list[str] = []
    for s in range(0, len(asks), args.batch):
        chunk = asks[s: s + args.batch]
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True))
               for a in chunk]
        gens = trimode.generate(model, ids, mode="ar", max_new_tokens=48, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed + s)
        for g in gens:
            text = tok.decode(g.tokens).strip().strip('"').strip()
            text = re.sub(r"^(request|question|user)\s*:\s*", "", text, flags=re.I).strip()
            m = re.search(r'(?:ask|say|type|write|request)[^"]{0,20}:?\s*"([^"]+)"?$', text)
            if m:  # 'A student might ask: "What is ...?"': keep the quoted request
                text = m.group(1).strip()
            text = text.strip('"').strip()
            if g.finish_reason != "stop" or "\n" in text or not 20 <= len(text) <= 200:
                continue
            if not text[0].isalpha() or text[-1] not in "?.!" or text.startswith(ASSISTANT_OPENINGS):
                continue
            key = text.lower()
            if key in seen or key in held:
                continue
            seen.add(key)
            out.append(text)
        print(f"  {min(s + args.batch, len(asks))}/{len(asks)} asked, {len(out)} kept", flush=True)
    write_prompts_jsonl(args.out, out)
    print(f"wrote {len(out)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
