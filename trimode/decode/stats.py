"""Counters derived from a row's forward trace, identical for every mode.

Conventions (nld-spec section 10): `nfe` counts every forward the row took part in, the prefill
included; `nfe_decode` leaves the prefill out. `tpf` = tokens / nfe; `tpf_decode` = tokens /
nfe_decode (the prefill-produced first token stays in the numerator, as the references count it).
`step_tokens` lists, for each forward that can finalise tokens, how many it finalised: the
per-step committed histogram. For speculative modes `acceptance` lists accepted + 1 (bonus) per
verifying forward, the acceptance length of vLLM/SGLang/SPEED-Bench.
"""

from __future__ import annotations

from collections import Counter

from .common import DRAFT, PREFILL, QUADRATIC, VERIFY


def row_stats(trace: list[list], n_tokens: int, *, mode: str) -> dict:
    kinds = Counter(kind for kind, _ in trace)
    nfe = len(trace)
    nfe_decode = nfe - kinds.get(PREFILL, 0)
    step_tokens = [n for kind, n in trace if kind != DRAFT]
    acceptance = [n for kind, n in trace if kind in (VERIFY, QUADRATIC)]
    return {
        "mode": mode,
        "tokens": n_tokens,
        "nfe": nfe,
        "nfe_decode": nfe_decode,
        "tpf": n_tokens / nfe if nfe else 0.0,
        "tpf_decode": n_tokens / nfe_decode if nfe_decode else float(n_tokens),
        "forwards": dict(kinds),
        "step_tokens": step_tokens,
        "acceptance": acceptance,
        "mean_acceptance": sum(acceptance) / len(acceptance) if acceptance else None,
    }
