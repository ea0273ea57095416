"""What a T-token forward costs against a 1-token one, on this machine, with our Transformer + KVCache.

    python scripts/forward_cost.py [--model smollm2] [--dtypes float32,bfloat16,int8,int4] [--context 128]

A "dtype" of int8 / int4 is the model loaded with that weight-only quantization (trimode.quant) over
float32 activations.

Speculation pays only where a forward of a block costs little more than one of a token (the model is
memory-bound). Prints, per dtype, the fastest of 3 rounds x 3 calls of each width, and the ratio to T=1.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--widths", default="1,4,8,16,32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from trimode import masks
    from trimode.checkpoint import load_model
    from trimode.dtypes import parse_dtype
    from trimode.models import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    widths = [int(w) for w in args.widths.split(",")]
    print(f"{args.model}, {args.threads} thread(s), {args.context} tokens cached, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for name in args.dtypes.split(","):
        if name in ("int8", "int4"):
            m = load_model(path, dtype=torch.float32, quantize=name).eval()
        else:
            m = load_model(path, dtype=parse_dtype(name)).eval()
        cache = m.new_cache(1, args.context + max(widths) + 1)
        P = args.context
        res: dict[int, float] = {}
        with torch.inference_mode():
            m(torch.randint(0, 1000, (1, P)), torch.arange(P)[None], mask=masks.causal(P), cache=cache)
            cache.commit(P)
            for _ in range(3):
                for T in widths:
                    pos = (P + torch.arange(T))[None]
                    mk = masks.with_prefix(masks.causal(T), cache.length, P + T)
                    toks = torch.randint(0, 1000, (1, T))
                    t0 = time.perf_counter()
                    for _ in range(3):
                        m(toks, pos, mask=mk, cache=cache)
                    res[T] = min(res.get(T, 1e9), (time.perf_counter() - t0) / 3)
        base = res[widths[0]]
        print(f"{name:>9}: " + "  ".join(f"T={T} {v * 1e3:.0f} ms ({v / base:.2f}x)" for T, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
