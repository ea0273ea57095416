"""How wide a forward this server may run in one cycle, measured on this model and this machine.

The worker cannot interrupt a forward, so a request whose cycle is long delays everyone else's next
token by that long. A token count alone does not bound that time: 1,024 tokens per forward cost about
two AR steps for an 8B model on a GPU (memory-bound) but 25 AR steps for the bundled model on a CPU.
So the default budget is a cost: the widest forward (tokens, rows x width) whose time stays within
`max_cost` AR steps, found at start-up by timing forwards of doubling width against a 1-token one
(both with the same cached prefix). `trimode serve --max-cycle-tokens N` skips the measurement.
"""

from __future__ import annotations

import time

WIDTHS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CONTEXT = 64  # tokens cached before the timed forwards (a short prompt)


def forward_seconds(model, width: int, *, context: int = CONTEXT, repeats: int = 3) -> float:
    """Fastest of `repeats` timed forwards of `width` tokens (batch 1) after `context` cached tokens."""
    import torch

    from .. import masks

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    cache = model.new_cache(1, context + width + 1)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        prefix = torch.randint(0, vocab, (1, context), generator=g).to(device)
        model(prefix, torch.arange(context, device=device)[None], mask=masks.causal(context).to(device),
              cache=cache)
        cache.commit(context)
        toks = torch.randint(0, vocab, (1, width), generator=g).to(device)
        pos = (context + torch.arange(width, device=device))[None]
        mask = masks.with_prefix(masks.causal(width), cache.length, context + width).to(device)
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(toks, pos, mask=mask, cache=cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best


def max_cycle_tokens(model, max_cost: float, *, floor: int = 1, ceiling: int | None = None) -> tuple[int, dict]:
    """The widest of WIDTHS (at least `floor`, at most `ceiling` or the context) whose forward costs at
    most `max_cost` times a 1-token forward; and the measurements {width: cost in AR steps}."""
    limit = min(ceiling or WIDTHS[-1], model.config.max_seq_len - CONTEXT - 1)
    one = forward_seconds(model, 1)
    costs: dict[int, float] = {}
    best, prev = 0, (1, 1.0)
    for w in WIDTHS:
        if w > limit:
            break
        costs[w] = cost = forward_seconds(model, w) / one
        if cost > max_cost:  # between the last width within budget and this one, cost is about linear
            lo_w, lo_c = prev
            best = lo_w + int((max_cost - lo_c) / max(cost - lo_c, 1e-9) * (w - lo_w))
            break
        best, prev = w, (w, cost)
    return max(best, floor), {"ar_step_ms": round(one * 1e3, 2),
                              "cost_in_ar_steps": {w: round(c, 2) for w, c in costs.items()}}
