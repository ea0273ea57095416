"""Projection kernels on SmolLM2-135M's shapes (30 layers x 7 matrices, 106M weights, random values),
one thread: fp32 and bf16 GEMMs, PyTorch's packed int8 / int4 kernels, and int8 dequantized into an
fp32 GEMM. Prints ms for one call of every projection at T tokens, then whether each kernel computes
a row the same alone as in a batch of 16 (bit for bit).

    python scripts/kernel_cost.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

LAYERS = 30
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
GROUP = 32


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w32 = [[torch.randn(n, k) * 0.05 for n, k in SHAPES] for _ in range(LAYERS)]
    wb = [[w.bfloat16() for w in layer] for layer in w32]
    q8, s8, p4, sz4 = [], [], [], []
    for layer in w32:
        a, b, c, d = [], [], [], []
        for w in layer:
            s = w.abs().amax(1) / 127
            a.append(torch.round(w / s[:, None]).to(torch.int8))
            b.append(s)
            n, k = w.shape
            g = w.reshape(n, k // GROUP, GROUP)
            lo, hi = g.amin(-1), g.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            codes = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32)
            c.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(n, k), 1))
            d.append(torch.stack([scale.t(), (lo + 8 * scale).t()], -1).contiguous().bfloat16())
        q8.append(a)
        s8.append(b)
        p4.append(c)
        sz4.append(d)
    kernels = {
        "fp32 GEMM": (lambda x, i, j: F.linear(x, w32[i][j]), torch.float32),
        "bf16 GEMM": (lambda x, i, j: F.linear(x, wb[i][j]), torch.bfloat16),
        "int8pack (bf16)": (lambda x, i, j: torch._weight_int8pack_mm(x, q8[i][j], s8[i][j].bfloat16()),
                            torch.bfloat16),
        "int8 deq + fp32": (lambda x, i, j: F.linear(x, q8[i][j].float()) * s8[i][j], torch.float32),
        "int4pack (bf16)": (lambda x, i, j: torch._weight_int4pack_mm_for_cpu(x, p4[i][j], GROUP, sz4[i][j]),
                            torch.bfloat16),
    }

    def cost(f, t: int, dtype) -> float:
        xs = {k: torch.randn(t, k).to(dtype) for k in (576, 1536)}

        def once():
            for i in range(LAYERS):
                for j, (_, k) in enumerate(SHAPES):
                    f(xs[k], i, j)

        once()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            once()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    print(f"{'T':>3} " + " ".join(f"{name:>16}" for name in kernels))
    for t in (1, 4, 8, 16, 32):
        print(f"{t:>3} " + " ".join(f"{cost(f, t, d):>13.1f} ms" for f, d in kernels.values()), flush=True)
    for name, (f, d) in kernels.items():
        x = torch.randn(16, 576).to(d)
        alone = torch.cat([f(x[i:i + 1], 0, 4) for i in range(16)])
        print(f"{name}: a row alone == the same row in a batch of 16: {torch.equal(f(x, 0, 4), alone)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
