"""Compiled (Transformer.compile_decode) against eager decoding, every mode, one run, interleaved.

    python scripts/compile_compare.py [--model bundled] [--max-new-tokens 64] [--repeats 3] [--modes ar,linear]

Both models get `for_inference` (draft adapter merged, q/k/v and gate/up fused). Each mode is first
run once on the compiled model (the compilation, timed separately), then per repeat eager and
compiled run back to back on the same prompt; the fastest repeat of each is reported, with whether
the compiled output equals the eager one token for token.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="ar,linear,quadratic,diffusion")
    args = ap.parse_args(argv)
    import trimode
    from trimode.models import for_inference, resolve_model
    from trimode.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    ids = load_tokenizer(path).encode(args.prompt)
    eager = for_inference(trimode.load_model(path))
    compiled = for_inference(trimode.load_model(path)).compile_decode(max_tokens=64)
    blocks = {"ar": None, "linear": 4, "quadratic": 3, "diffusion": 4}
    modes = [(m, blocks[m]) for m in args.modes.split(",")]
    print(f"{args.model}, {args.max_new_tokens} tokens, 1 thread, load average {os.getloadavg()[0]:.2f}")
    print(f"{'mode':>10} {'compile s':>9} {'eager tok/s':>11} {'compiled tok/s':>14} {'speed-up':>8}  identical")
    for mode, bl in modes:
        kw = {"block_len": bl} if bl else {}
        t0 = time.perf_counter()
        trimode.generate(compiled, [ids], mode=mode, max_new_tokens=args.max_new_tokens, **kw)
        compile_s = time.perf_counter() - t0
        best_e = best_c = float("inf")
        same = True
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = trimode.generate(eager, [ids], mode=mode, max_new_tokens=args.max_new_tokens, **kw)[0]
            best_e = min(best_e, time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = trimode.generate(compiled, [ids], mode=mode, max_new_tokens=args.max_new_tokens, **kw)[0]
            best_c = min(best_c, time.perf_counter() - t0)
            same &= a.tokens == b.tokens
        n = len(a.tokens)
        print(f"{mode:>10} {compile_s:>9.1f} {n / best_e:>11.1f} {n / best_c:>14.1f} {best_e / best_c:>7.2f}x  {same}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
