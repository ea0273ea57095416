"""Metrics, identical for every mode, from a `RunResult` (docs/design-notes.md §8).

- `tpf` = tokens / NFE (prefill included), `tpf_decode` = tokens / NFE without the prefill; NFE from
  the wrapper's count of forwards run and, per row, from the decoder (they are checked equal at batch
  1; at batch > 1 a forward serves several rows, so per-row NFE sums exceed forwards run);
- `step_hist`: per-step committed-token histogram over every forward that can finalise tokens
  (drafts finalise none and are left out), the statistic that makes AR, diffusion and speculation one;
- `acceptance`: accepted drafts + 1 bonus per verifying forward (linear verify, quadratic), its mean
  and histogram, and the per-position conditional acceptance P(draft i accepted | drafts < i
  accepted). A row's last verify is left out of the conditional rate: EOS or the token budget may cut
  its emission short, which would read as a rejection;
- tokens/s (wall clock of the decode loop) and, per forward kind, count, mean time, FLOPs, bytes and
  the fraction of the roofline bound reached;
- agreement with AR greedy: outputs identical, and token agreement (position-wise over the longer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..config import ModelConfig
from .roofline import Machine, bound_seconds, forward_cost
from .runner import RowResult, RunResult
from .timing import Call


def agreement(out: Sequence[int], ref: Sequence[int]) -> float:
    n = max(len(out), len(ref))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(out, ref)) / n


def conditional_acceptance(rows: Sequence[RowResult], max_drafts: int) -> list[float | None]:
    """P(draft i accepted | drafts 1..i-1 accepted) for i = 1..max_drafts."""
    accepted: list[int] = []
    for r in rows:
        acc = r.stats["acceptance"]
        accepted.extend(a - 1 for a in acc[:-1])
    out: list[float | None] = []
    for i in range(1, max_drafts + 1):
        reached = sum(1 for a in accepted if a >= i - 1)
        out.append(sum(1 for a in accepted if a >= i) / reached if reached else None)
    return out


def kind_table(calls: Sequence[Call], c: ModelConfig, *, bytes_per_weight: int, machine: Machine | None) -> dict:
    """Per forward kind: count, seconds, ms per forward, tokens in, FLOPs, bytes, roofline fraction."""
    out: dict[str, dict] = {}
    for call in calls:
        k = out.setdefault(call.kind, {"count": 0, "seconds": 0.0, "tokens_in": 0, "flops": 0.0, "bytes": 0.0,
                                       "bound_seconds": 0.0})
        f, b = forward_cost(c, B=call.B, T=call.T, S=call.S, n_logits=call.n_logits, bytes_per_weight=bytes_per_weight)
        k["count"] += 1
        k["seconds"] += call.seconds
        k["tokens_in"] += call.B * call.T
        k["flops"] += f
        k["bytes"] += b
        if machine is not None:
            k["bound_seconds"] += bound_seconds(f, b, machine)
    for k in out.values():
        k["ms_per_forward"] = 1e3 * k["seconds"] / k["count"]
        k["flops_per_s"] = k["flops"] / k["seconds"] if k["seconds"] else None
        k["bytes_per_s"] = k["bytes"] / k["seconds"] if k["seconds"] else None
        k["roofline_fraction"] = k["bound_seconds"] / k["seconds"] if machine is not None and k["seconds"] else None
        if machine is None:
            del k["bound_seconds"]
    return out


def summarize_rows(rows: Sequence[RowResult], calls: Sequence[Call], seconds: float, *, block_len: int,
                   reference: dict[str, list[int]] | None) -> dict:
    tokens = sum(len(r.tokens) for r in rows)
    nfe = sum(r.stats["nfe"] for r in rows)
    nfe_decode = sum(r.stats["nfe_decode"] for r in rows)
    hist = Counter(n for r in rows for n in r.stats["step_tokens"])
    acc = [a for r in rows for a in r.stats["acceptance"]]
    out = {
        "prompts": len(rows),
        "tokens": tokens,
        "nfe": nfe,
        "nfe_decode": nfe_decode,
        "forwards_run": len(calls),
        "tpf": tokens / nfe if nfe else 0.0,
        "tpf_decode": tokens / nfe_decode if nfe_decode else float(tokens),
        "step_hist": {int(k): v for k, v in sorted(hist.items())},
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "forward_seconds": sum(c.seconds for c in calls),
        "finish": dict(Counter(r.finish_reason for r in rows)),
    }
    out["overhead_fraction"] = 1 - out["forward_seconds"] / seconds if seconds else None
    if acc:
        out["mean_acceptance"] = sum(acc) / len(acc)
        out["acceptance_hist"] = {int(k): v for k, v in sorted(Counter(acc).items())}
        out["conditional_acceptance"] = conditional_acceptance(rows, max(block_len - 1, 0))
    else:
        out["mean_acceptance"] = None
    if reference is not None:
        refs = [reference[r.prompt.source] for r in rows]
        out["identical_to_ar"] = sum(r.tokens == ref for r, ref in zip(rows, refs)) / len(rows) if rows else None
        out["agreement_with_ar"] = (sum(agreement(r.tokens, ref) for r, ref in zip(rows, refs)) / len(rows)
                                    if rows else None)
    return out


def summarize(res: RunResult, c: ModelConfig, *, bytes_per_weight: int, machine: Machine | None,
              reference: dict[str, list[int]] | None) -> dict:
    """The whole run plus one entry per category."""
    k = res.config.block_len
    out = {"config": res.config.label, "mode": res.config.mode, "block_len": k, "tree_nodes": res.config.tree_nodes,
           "tree_min_prob": res.config.tree_min_prob, "datastore": res.config.datastore,
           "drafter": res.config.drafter if res.config.mode == "linear" else None,
           "threshold": res.config.threshold, "policy": res.config.policy}
    out.update(summarize_rows(res.rows, res.calls, res.seconds, block_len=k, reference=reference))
    out["kinds"] = kind_table(res.calls, c, bytes_per_weight=bytes_per_weight, machine=machine)
    out["categories"] = {}
    for cat, secs in res.by_category_seconds.items():
        rows = [r for r in res.rows if r.prompt.category == cat]
        out["categories"][cat] = summarize_rows(rows, res.by_category_calls[cat], secs, block_len=k,
                                                reference=reference)
    return out
