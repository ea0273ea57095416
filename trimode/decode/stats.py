"""Counters derived from a row's forward trace, identical for every mode.

A row's trace has one entry per forward it took part in: [kind, kept], and for a verifying forward
(linear VERIFY, QUADRATIC) [kind, kept, accepted]. `kept` counts the tokens `Row.emit` appended to
the row's output; `accepted` is recorded by the decoder itself (`record(..., accepted=...)`) from
the verifier's decision, before EOS, stop tokens or the token budget cut the emission short.

Conventions (nld-spec section 10):

- `tokens`: new tokens, EOS / stop tokens excluded (what the row returns).
- `nfe` counts every forward the row took part in, the prefill included; `nfe_decode` leaves the
  prefill out. `tpf` = tokens / nfe; `tpf_decode` = tokens / nfe_decode (the prefill-produced first
  token stays in the numerator, as the references count it).
  In a batch a row is charged only for the forwards it needed: in diffusion mode a row whose block
  is complete (or that stopped at its own EOS) does not take part in the denoising forwards its
  neighbours still run, so per-row counters are what the row would report decoded alone.
- `step_tokens` lists, for each forward that can finalise tokens (drafts cannot), how many tokens
  of the row's output it finalised: the per-step committed histogram. sum(step_tokens) == tokens;
  a stop token, being no output token, counts in no step.
- `acceptance` (speculative modes) lists, per verifying forward, the acceptance length the verifier
  decided: accepted drafts + 1 (the bonus or recovered token), the convention of
  vLLM/SGLang/SPEED-Bench. It is always >= 1. It counts a stop token the forward produced, and
  everything the verifier accepted after it, as accepted: EOS ending a reply is a correct
  prediction, not a rejection (a reply ending in a forward that verifies only EOS reports 1, not 0).
  It is not capped by the budget either: a row that finishes with "length" reports what the
  verifier accepted in its last forward even when only part of it fits. (Alone, a row's last cycle
  is narrowed to its remaining budget, so this only happens in a batch whose widest row needs more,
  or for rows verifying by rejection, which always draft a full block.) Hence, for the verifying
  forwards, step_tokens[i] <= acceptance[i], with equality unless EOS, a stop token, the budget or a
  cancellation ended the row in that forward. `mean_acceptance` is their mean (None without verifying forwards).
"""

from __future__ import annotations

from collections import Counter

from .common import DRAFT, PREFILL, QUADRATIC, VERIFY

VERIFYING = (VERIFY, QUADRATIC)


def row_stats(trace: list[list], n_tokens: int, *, mode: str) -> dict:
    kinds = Counter(e[0] for e in trace)
    nfe = len(trace)
    nfe_decode = nfe - kinds.get(PREFILL, 0)
    step_tokens = [e[1] for e in trace if e[0] != DRAFT]
    acceptance = [e[2] for e in trace if e[0] in VERIFYING]
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
