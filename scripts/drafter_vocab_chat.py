"""Does the feature drafter's vocabulary limit chat drafting? Candidate vocabularies against the shipped
one: the share of AR chat tokens a draft cannot propose, and tokens per forward on held-out chat.

    python scripts/drafter_vocab_chat.py --data-cache runs/smol/distill2400x96.pt runs/smol/advice500x96.pt \\
        runs/smol/extra1303x96.pt runs/smol/reference.pt --chat-cache runs/smol/advice500x96.pt

Candidates are ranked as `trimode train-feature-drafter` ranks its vocabulary (targets + the training
splits + the stdlib), by all the caches' targets, and, with `+chat`, with the chat cache's targets
mixed in once more. The drafter itself is not retrained: it predicts features, and its draft logits are
the base head's rows for whatever ids it is given. Decoding: linear, k = 5, an 8-node tree, depth cut
0.05, on the held-out chat prompts 11-30 (the benchmark uses 1-5), bf16, one thread.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-cache", nargs="+", required=True, help="self-distillation caches (.pt): the targets")
    p.add_argument("--chat-cache", required=True, help="a chat cache (.pt): its misses are reported")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sizes", default="8192,12288,16384")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args(argv)

    import torch

    import trimode
    from trimode import draftvocab
    from trimode.bench.suites import build_suites
    from trimode.checkpoint import load_model
    from trimode.models import for_inference, resolve_model
    from trimode.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    model = for_inference(load_model(path, dtype=torch.bfloat16))
    fd, c = model.feature_drafter, model.config
    if fd is None:
        raise SystemExit("the model has no feature drafter")
    V = c.vocab_size

    def load(f):
        d = torch.load(f, weights_only=False)
        if not isinstance(d, dict) or "tokens" not in d or "valid" not in d:
            raise SystemExit(f"{f}: not a self-distillation cache")
        return d

    def counts(d):
        return torch.bincount(d["tokens"][d["valid"].bool()].reshape(-1), minlength=V)

    targets = sum(counts(load(f)) for f in args.data_cache)
    chat = load(args.chat_cache)
    corpus = list(draftvocab.corpus_counts(tok, V, log=lambda s: None).values())
    keep, drop = [c.eos_token_id], [c.mask_token_id] if c.mask_token_id is not None else []
    cands = {f"shipped {fd.ids.numel()}": fd.ids.clone()}
    for n in (int(x) for x in args.sizes.split(",")):
        cands[f"targets {n}"] = draftvocab.from_counts(draftvocab.mixture(targets, *corpus), n, keep=keep, drop=drop)
        cands[f"targets+chat {n}"] = draftvocab.from_counts(draftvocab.mixture(targets, counts(chat), *corpus), n,
                                                            keep=keep, drop=drop)

    def miss(ids):  # continuation tokens outside the ids, the prompt and the output so far
        inv = torch.zeros(V, dtype=torch.bool)
        inv[ids] = True
        bad = tot = 0
        for i in range(chat["tokens"].shape[0]):
            P, L = int(chat["prompt_lengths"][i]), int(chat["lengths"][i])
            row = chat["tokens"][i, :L].tolist()
            seen = set(row[:P])
            for t in row[P:]:
                tot += 1
                bad += not (inv[t] or t in seen)
                seen.add(t)
        return bad / max(tot, 1)

    suite = build_suites(tok, categories=["chat"], n=30, chat=True, model_dir=path)["chat"]
    prompts = [list(q.tokens) for q in suite[10:]]
    shipped = fd.ids
    print(f"{'vocabulary':<22} {'chat cache misses':>17} {'held-out chat tok/fwd':>22}")
    for name, ids in cands.items():
        fd.ids, fd._rows, fd._extra = ids, None, None
        tok_n = nfe = 0
        for q in prompts:
            g = trimode.generate(model, [q], mode="linear", max_new_tokens=args.max_new_tokens, block_len=5,
                                 tree_nodes=8, drafter="feature", tree_min_prob=0.05)[0]
            tok_n += len(g.tokens)
            nfe += g.nfe
        print(f"{name:<22} {miss(ids):>17.4f} {tok_n / nfe:>22.3f}", flush=True)
    fd.ids, fd._rows, fd._extra = shipped, None, None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
