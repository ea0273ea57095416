"""Requests and what decoding reports about them: `Row`, `Step`, the forward kinds and the counters.

A `Row` is one request (prompt, budget, stop ids, sampling) plus its output and its forward trace;
it holds no decoder scratch. Decoders hand it tokens through `emit`, which applies EOS, stop tokens
and the budget in one place. A `Step` is one model forward (or an EMIT without one) and the tokens
each row finalised with it.

Counters (`row_stats`), identical for every mode. A row's trace has one entry per forward it took
part in: [kind, kept], and for a verifying forward (linear VERIFY, QUADRATIC) [kind, kept, accepted].
`kept` counts the tokens `emit` appended; `accepted` is what the verifier decided, before EOS, stop
tokens or the budget cut the emission short.

- `tokens`: new tokens, EOS / stop tokens excluded (what the row returns).
- `nfe` counts every forward the row took part in, the prefill included; `nfe_decode` leaves the
  prefill out. `tpf` = tokens / nfe; `tpf_decode` = tokens / nfe_decode (the prefill-produced first
  token stays in the numerator, as the diffusion-LM papers count it). In a batch a row is charged
  only for the forwards it needed (a diffusion row whose block is complete does not take part in
  the denoising forwards its neighbours still run), so per-row counters equal the row's alone.
- `step_tokens`: for each forward that can finalise tokens (drafts cannot), how many of the row's
  output tokens it finalised. sum(step_tokens) == tokens; a stop token counts in no step.
- `acceptance` (speculative modes): per verifying forward, accepted drafts + 1 (the bonus or
  recovered token), the convention of vLLM / SGLang / SPEED-Bench; always >= 1. A stop token the
  verifier produced counts as accepted (EOS ending a reply is a correct prediction), and it is not
  capped by the budget, so step_tokens[i] <= acceptance[i], with equality unless EOS, a stop
  token, the budget or a cancellation ended the row in that forward.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..sampling import RowRandom, SamplingParams

# Forward kinds, the vocabulary of every counter.
PREFILL, AR_STEP, DRAFT, VERIFY, DENOISE, COMMIT, QUADRATIC = (
    "prefill", "ar", "draft", "verify", "denoise", "commit", "quadratic",
)
FORWARD_KINDS = (PREFILL, AR_STEP, DRAFT, VERIFY, DENOISE, COMMIT, QUADRATIC)
VERIFYING = (VERIFY, QUADRATIC)
EMIT = "emit"  # a Step that hands out tokens without running a forward


class Row:
    """One request: its prompt, budget, stop ids, sampling, what it has produced, its forward
    trace, and whether it is finished. Decoders move rows in and out of batches."""

    def __init__(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        stop_ids: Iterable[int] = (),
        index: int = 0,
        sampling: SamplingParams | None = None,
    ) -> None:
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a trimode.sampling.SamplingParams or None, got {sampling!r:.80}")
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(int(s) for s in stop_ids)
        self.index = index  # position in the caller's list of prompts
        self.sampling = sampling  # None (or temperature 0): greedy
        # The request's own generator (uniforms keyed by generated-token index); None when greedy.
        self.rng = RowRandom(sampling.seed) if sampling is not None and not sampling.greedy else None
        # The acceptance rule it verifies with, set at admit by speculative decoders (reported in stats).
        self.acceptance_rule: str | None = None
        # A VLM prompt's image features (n_image_tokens, hidden), placed at its image tokens in the
        # prefill (trimode.images.embed_prompts); None for text.
        self.image_embeds = None
        self.tokens: list[int] = []
        self.done = False
        self.finish_reason: str | None = None
        self.trace: list[list] = []
        # The thinking budget (decode/thinking.py), or None.
        self.think = None

    def __repr__(self) -> str:
        return f"Row(index={self.index}, prompt={len(self.prompt)} tokens, new={len(self.tokens)}, done={self.done})"

    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def cancel(self) -> None:
        """Stop this row; its decoder drops it (and frees its cache row) at the next boundary."""
        if not self.done:
            self.done, self.finish_reason = True, "cancelled"

    def emit(self, toks: Sequence[int], credit: Sequence[int] | None = None) -> list[int]:
        """Append tokens until EOS / a stop token / the budget; return what was kept.

        credit[i], when given, is the index in `trace` of the forward that finalised toks[i]
        (diffusion fills a block over several forwards); otherwise the row's last forward is credited.
        """
        kept: list[int] = []
        if self.done:
            return kept
        for i, t in enumerate(toks):
            t = int(t)
            if t in self.stop_ids:
                self.done, self.finish_reason = True, "stop"
                break
            kept.append(t)
            self.tokens.append(t)
            if self.think is not None:
                self.think.advance(t)
            self.trace[credit[i] if credit is not None else -1][1] += 1
            if len(self.tokens) >= self.max_new_tokens:
                self.done, self.finish_reason = True, "length"
                break
        return kept

    def stats(self, mode: str) -> dict:
        st = row_stats(self.trace, len(self.tokens), mode=mode)
        sampled = self.rng is not None
        st["temperature"] = float(self.sampling.temperature) if sampled else 0.0
        st["seed"] = self.rng.seed if sampled else None
        st["acceptance_rule"] = self.acceptance_rule
        st["acceptance_requested"] = self.sampling.acceptance if sampled and self.acceptance_rule else None
        return st


def make_rows(prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Iterable[int],
              sampling: Sequence[SamplingParams | None] | None = None) -> list[Row]:
    """The rows of one `generate` call, in prompt order (row.index = its prompt's position)."""
    stop = frozenset(int(s) for s in stop_ids)
    params = list(sampling) if sampling is not None else [None] * len(prompts)
    return [Row(p, max_new_tokens=max_new_tokens, stop_ids=stop, index=i, sampling=sp)
            for i, (p, sp) in enumerate(zip(prompts, params))]


@dataclass
class Step:
    """One model forward (or, with kind EMIT, no forward): its kind and the tokens each row
    finalised with it. new_tokens[i] belongs to rows[i] (an empty list: it finalised nothing; None:
    it did not take part). `generate`-level streams index new_tokens by the caller's prompt order."""

    kind: str
    new_tokens: list[list[int] | None]
    rows: Sequence[Row] = ()


def row_stats(trace: list[list], n_tokens: int, *, mode: str) -> dict:
    kinds = Counter(e[0] for e in trace)
    nfe = len(trace)
    nfe_decode = nfe - kinds.get(PREFILL, 0)
    acceptance = [e[2] for e in trace if e[0] in VERIFYING]
    return {
        "mode": mode,
        "tokens": n_tokens,
        "nfe": nfe,
        "nfe_decode": nfe_decode,
        "tpf": n_tokens / nfe if nfe else 0.0,
        "tpf_decode": n_tokens / nfe_decode if nfe_decode else float(n_tokens),
        "forwards": dict(kinds),
        "step_tokens": [e[1] for e in trace if e[0] != DRAFT],
        "acceptance": acceptance,
        "mean_acceptance": sum(acceptance) / len(acceptance) if acceptance else None,
    }
