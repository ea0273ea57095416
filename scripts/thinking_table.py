"""Where </think> lands, per mode and thinking budget (the bundled model, a prompt ending in <think>).

    python scripts/thinking_table.py [--model bundled] [--budgets 0,2,5,10] [--max-new-tokens 24]

Each cell: the index (in the generated tokens) where the </think> ids start, and whether it equals
the budget; greedy, batch 4 (one row per budget, all in one batch), block length 4.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--budgets", default="0,2,5,10")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--prompt", default="Q: why?\n<think>")
    args = ap.parse_args(argv)
    import trimode
    from trimode.models import resolve_model
    from trimode.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    model, tok = trimode.load_model(path), load_tokenizer(path)
    think = tok.think_ids()
    close = think[1]
    budgets = [int(b) for b in args.budgets.split(",")]
    ids = tok.encode(args.prompt)
    print(f"{args.model}: prompt {args.prompt!r} ({len(ids)} tokens), </think> = {close}")
    print("| mode | " + " | ".join(f"budget {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for mode in ("ar", "linear", "quadratic", "diffusion"):
        outs = trimode.generate(model, [ids] * len(budgets), mode=mode, max_new_tokens=args.max_new_tokens,
                                block_len=4, eos_id=tok.eos_id, max_thinking_tokens=budgets, think_ids=think)
        cells = []
        for b, g in zip(budgets, outs):
            t = g.tokens
            at = next((i for i in range(len(t) - len(close) + 1) if t[i:i + len(close)] == close), None)
            cells.append("-" if at is None else f"{at} ({'=' if at == b else '!='} budget)")
        print(f"| {mode} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
