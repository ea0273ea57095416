"""Shape benchmark: a model of a given shape with random weights; time each forward kind at batch 1.

`trimode bench --synthetic nld-8b --device cuda` builds an NLD-8B-shaped model (the shape in
`nvidia/Nemotron-Labs-Diffusion-8B`'s config.json) in bf16 and times, against a cached context of
`context` tokens: the prefill, one AR step, the linear draft (k tokens, bidirectional, k - 1
logits) and verify (k tokens, causal, k logits) at k = 16, 32, and the fused quadratic forward
(k(k+1) tokens) at k = 8, 16. Then it projects steady-state decode tokens/s at given acceptance
lengths a (tokens per verify, bonus included):

  ar: 1 / t_ar;  linear k: a / (t_draft + t_verify);  quadratic k: a / t_quad  (a <= k).

Weights are random, so the timings hold for any checkpoint of that shape and the acceptance
lengths come from elsewhere (5.46 and 6.82 are the NLD report's, arXiv 2607.05722). Scaled-down
shapes (`nld-mini`, `tiny`) run on CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .. import masks
from ..config import ModelConfig
from ..model import Transformer, rope_inv_freq
from .roofline import Machine, bound_seconds, forward_cost

SHAPES: dict[str, dict] = {
    # Nemotron-Labs-Diffusion-8B (config.json): 34 layers, hidden 4096, SwiGLU 14336, 32 / 8 heads of 128,
    # vocab 131072.
    "nld-8b": dict(vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_layers=34,  # noqa: C408
                   num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6),
    "nld-3b": dict(vocab_size=131072, hidden_size=3072, intermediate_size=9216, num_layers=26,  # noqa: C408
                   num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6),
    # The 8B's proportions (GQA 4, head_dim 128, SwiGLU 3.5x) at CPU size.
    "nld-mini": dict(vocab_size=16384, hidden_size=512, intermediate_size=1792, num_layers=4,  # noqa: C408
                     num_heads=4, num_kv_heads=1, head_dim=128, rope_theta=1e6),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=224, num_layers=2,  # noqa: C408
                 num_heads=4, num_kv_heads=1, head_dim=16, rope_theta=1e4),
}
DEFAULT_ACCEPT = (2.0, 3.0, 5.46, 6.82)


def shape_config(name: str, *, max_seq_len: int = 8192) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic shape {name!r}; choose one of {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name], max_seq_len=max_seq_len, mask_token_id=100 if name != "tiny" else 3,
                       tie_word_embeddings=False)


def random_model(config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Transformer:
    """Random N(0, 0.02) weights allocated directly in `dtype` on `device` (no fp32 copy)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.inv_freq = rope_inv_freq(config)[0].to(device)
    return model.eval()


@dataclass
class KindTiming:
    kind: str
    k: int
    T: int
    n_logits: int
    seconds: float  # median
    flops: float
    bytes: float


def _time(fn, *, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_kinds(
    model: Transformer,
    *,
    context: int,
    linear_ks: tuple[int, ...] = (16, 32),
    quadratic_ks: tuple[int, ...] = (8, 16),
    warmup: int = 3,
    reps: int = 10,
) -> list[KindTiming]:
    """Median time of each forward kind at batch 1 on top of a cached context of `context` tokens."""
    c = model.config
    dev = model.device
    w = torch.finfo(model.dtype).bits // 8
    widest = max([1, *linear_ks, *(k * (k + 1) for k in quadratic_ks)])
    if context + widest > c.max_seq_len:
        raise ValueError(f"context {context} + {widest} scratch tokens exceeds max_seq_len {c.max_seq_len}")
    cache = model.new_cache(1, context + widest + 1)
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, c.vocab_size, (1, context), generator=g).to(dev)
    out: list[KindTiming] = []

    def add(kind: str, k: int, T: int, n: int, S: int, fn) -> None:
        s = _time(fn, device=dev, warmup=warmup, reps=reps)
        f, b = forward_cost(c, B=1, T=T, S=S, n_logits=n, bytes_per_weight=w)
        out.append(KindTiming(kind, k, T, n, s, f, b))

    with torch.inference_mode():
        def do_prefill() -> None:
            cache.truncate(0)
            model(prompt, mask=masks.causal(context, device=dev), cache=cache,
                  logits_at=torch.full((1, 1), context - 1, device=dev))
            cache.commit(context)

        add("prefill", context, context, 1, context, do_prefill)
        L = torch.tensor([context], device=dev)

        def call(tokens: torch.Tensor, inner: torch.Tensor, offs: torch.Tensor, at: torch.Tensor) -> None:
            T = tokens.shape[1]
            model(tokens, (L[:, None] + offs[None, :]), mask=masks.with_prefix(inner, L, context + T), cache=cache,
                  logits_at=at[None, :])

        def tok(T: int) -> torch.Tensor:
            return torch.randint(0, c.vocab_size, (1, T), generator=g).to(dev)

        one = tok(1)
        z = torch.zeros(1, dtype=torch.long, device=dev)
        add("ar", 1, 1, 1, context + 1, lambda: call(one, masks.causal(1, device=dev), z, z))
        for k in linear_ks:
            t = tok(k)
            ar_ = torch.arange(k, device=dev)
            bid, cau = masks.bidirectional(k, device=dev), masks.causal(k, device=dev)
            add("draft", k, k, k - 1, context + k, lambda t=t, ar_=ar_, m=bid: call(t, m, ar_, ar_[1:]))
            add("verify", k, k, k, context + k, lambda t=t, ar_=ar_, m=cau: call(t, m, ar_, ar_))
        for k in quadratic_ks:
            n = k + 1
            t = tok(k * n)
            offs = masks.quadratic_positions(k, device=dev)
            j = torch.arange(k, device=dev)
            want = torch.cat([j * n, (j[:, None] * n + torch.arange(2, n, device=dev)[None, :]).reshape(-1)])
            quad = masks.quadratic(k, device=dev)
            add("quadratic", k, k * n, int(want.numel()), context + k * n,
                lambda t=t, offs=offs, want=want, m=quad: call(t, m, offs, want))
    return out


def project(timings: list[KindTiming], accept: tuple[float, ...]) -> list[dict]:
    """Steady-state decode tokens/s per scheme and acceptance length (see the module docstring)."""
    by = {(t.kind, t.k): t.seconds for t in timings}
    t_ar = by[("ar", 1)]
    rows = [{"scheme": "ar", "forward_s": t_ar, "tokens_per_s": {str(a): 1 / t_ar for a in accept}}]
    for (kind, k), s in sorted(by.items()):
        if kind == "draft":
            cyc = s + by[("verify", k)]
            rows.append({"scheme": f"linear k={k}", "forward_s": cyc,
                         "tokens_per_s": {str(a): (a / cyc if a <= k else None) for a in accept}})
        elif kind == "quadratic":
            rows.append({"scheme": f"quadratic k={k}", "forward_s": s,
                         "tokens_per_s": {str(a): (a / s if a <= k else None) for a in accept}})
    for r in rows:
        r["speedup_vs_ar"] = {a: (v * t_ar if v is not None else None) for a, v in r["tokens_per_s"].items()}
    return rows


def run_synthetic(
    name: str,
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    context: int | None = None,
    linear_ks: tuple[int, ...] = (16, 32),
    quadratic_ks: tuple[int, ...] = (8, 16),
    accept: tuple[float, ...] = DEFAULT_ACCEPT,
    reps: int | None = None,
    machine: Machine | None = None,
) -> dict:
    """Build, time, project. Raises ValueError when `device` is unavailable (the CLI skips cleanly)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine")
    cuda = dev.type == "cuda"
    context = context if context is not None else (1024 if cuda else 64)
    cfg = shape_config(name, max_seq_len=max(8192, context + 1024))
    model = random_model(cfg, dtype=dtype, device=dev)
    timings = time_kinds(model, context=context, linear_ks=linear_ks, quadratic_ks=quadratic_ks,
                         reps=reps or (20 if cuda else 3), warmup=3 if cuda else 1)
    kinds = []
    for t in timings:
        d = {"kind": t.kind, "k": t.k, "T": t.T, "n_logits": t.n_logits, "ms": 1e3 * t.seconds,
             "gflops": t.flops / 1e9, "mbytes": t.bytes / 2**20}
        if machine is not None:
            d["roofline_fraction"] = bound_seconds(t.flops, t.bytes, machine) / t.seconds
        kinds.append(d)
    out = {
        "shape": name,
        "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                 "num_heads", "num_kv_heads", "head_dim")},
        "parameters": cfg.num_parameters(),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "context": context,
        "batch": 1,
        "kinds": kinds,
        "projection": project(timings, accept),
    }
    if machine is not None:
        out["machine"] = machine.as_dict()
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out
