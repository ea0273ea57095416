"""Sampling at temperature > 0 and the acceptance rules of speculative decoding.

Pure tensor-in / tensor-out functions, batched over rows (each row may carry its own parameters),
plus one small state object per request (`RowRandom`: its torch.Generator and the uniforms drawn
from it). Vocabulary (vLLM): a verify step *accepts* a prefix of the drafts, then emits either a
*recovered* token (at the first rejection) or a *bonus* token (all drafts accepted).

Processing (`process_logits`), the same for every distribution we sample from or compare, draft
and target alike: logits / temperature -> softmax -> top-k -> top-p (nucleus, on the top-k
renormalised mass) -> min-p (relative to the most likely token) -> renormalise. Temperature 0 is
greedy: a one-hot distribution on the argmax.

Sampling draws one uniform per token and inverts the CDF (`sample`), so a sample is a deterministic
function of (distribution, uniform). Uniforms come from the request's own generator and are keyed
by the *generated-token index* (`RowRandom.at`): the uniforms used for token t are the t-th chunk
of the generator's stream, whatever the cycle structure, draft length or batch around the request.
Hence: same seed, same output at batch 1 and inside any batch; and the `match` rule emits exactly
the tokens AR sampling emits for the same seed (both sample token t from the same distribution
with the same uniform).

Acceptance rules (for drafts d_1..d_n proposed after the newest emitted token):

- `accept_match` (verify-by-sampling): sample y_i ~ p_i from the verifier at every position, accept
  while y_i == d_i, emit y_0..y_c. Every emitted token is a target sample given the emitted prefix,
  whatever produced the drafts, so it is lossless for any draft.
- `accept_rejection` (Leviathan et al. 2023, arXiv 2211.17192, Alg. 1; Chen et al. 2023, arXiv
  2302.01318, Alg. 2): accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
  rejection emit a recovered token from normalise(max(0, p_i - q_i)); if all n are accepted, emit a
  bonus token from p_{n+1}. Lossless only if, given everything emitted so far (and anything else
  the acceptance decisions have revealed), d_i was drawn from exactly the recorded q_i with fresh
  randomness. Which of our drafts satisfy this is decided by `resolve_rule`; docs/sampling.md
  gives the argument for each mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ACCEPTANCE_RULES = ("match", "rejection", "auto")

# Streams of position-keyed uniforms: column of RowRandom.at(...)[:, i].
U_SAMPLE, U_ACCEPT, U_RESIDUAL, U_DRAFT = 0, 1, 2, 3
N_STREAMS = 4
_CHUNK = 64  # positions drawn per generator call; fixed, so the stream never depends on call sizes


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling controls.

    temperature: 0 = greedy (argmax; every other field but `seed` is then ignored). top_k: keep the
    k most likely tokens (0 = off). top_p: keep the smallest set of most likely tokens whose mass
    reaches top_p (1.0 = off). min_p: drop tokens below min_p times the most likely token's
    probability (0.0 = off). seed: seeds this request's own torch.Generator (None: a
    nondeterministic seed, reported in the row's stats). acceptance: speculative modes' rule,
    "match" (verify-by-sampling), "rejection" (Leviathan/Chen) or "auto" (rejection where the
    draft makes it valid, else match).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    acceptance: str = "auto"

    def __post_init__(self) -> None:
        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_num(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p!r}")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must lie in [0, 1] (0 = off), got {self.min_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE_RULES)}, got {self.acceptance!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0



def top1(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token: index of the largest logit on the last dim, the first among ties (as
    torch.argmax). `max(-1).indices` is the same index and on CPU much faster for bfloat16 logits
    (measured, 13 x 49152: 1.0 ms against 3.4 ms for argmax, a tenth of a SmolLM2 verify forward)."""
    return logits.max(-1).indices

def resolve_rule(params: SamplingParams | None, *, independent_draft: bool) -> str:
    """The rule a row actually uses: "greedy", "match" or "rejection".

    independent_draft: the decoder's drafts were each sampled, with fresh randomness, from a
    recorded distribution q_i that depends only on what is already emitted (one draft pass, no
    confidence ordering, no external override). Only then is "rejection" valid; "auto" picks it
    there and "match" elsewhere, and an explicit "rejection" falls back to "match" (the row's stats
    say which rule ran).
    """
    if params is None or params.greedy:
        return "greedy"
    if params.acceptance == "match" or not independent_draft:
        return "match"
    return "rejection"


# --- per-request randomness -------------------------------------------------------------------


class RowRandom:
    """A request's generator and the uniforms drawn from it.

    `at(start, n)` returns the (n, N_STREAMS) float64 uniforms of generated tokens start..start+n-1:
    row t is always the t-th chunk of N_STREAMS draws of the generator's stream (drawn lazily, in
    fixed-size blocks), so a token's randomness depends only on the seed and its index. `fresh(n)`
    draws new uniforms in call order (diffusion mode); a decoder uses one or the other, not both.
    """

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.seed = self.generator.initial_seed()
        self._buf = torch.empty(0, N_STREAMS, dtype=torch.float64)

    def at(self, start: int, n: int) -> torch.Tensor:
        while self._buf.shape[0] < start + n:
            more = torch.rand(_CHUNK, N_STREAMS, dtype=torch.float64, generator=self.generator)
            self._buf = torch.cat([self._buf, more])
        return self._buf[start : start + n]

    def fresh(self, n: int) -> torch.Tensor:
        return torch.rand(n, dtype=torch.float64, generator=self.generator)


def uniforms_at(
    rngs: Sequence[RowRandom | None], starts: Sequence[int], n: int, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B, n, N_STREAMS) position-keyed uniforms; rows without a RowRandom (greedy) get zeros."""
    out = torch.zeros(len(rngs), n, N_STREAMS, dtype=torch.float64)
    for b, (r, s) in enumerate(zip(rngs, starts)):
        if r is not None and n > 0:
            out[b] = r.at(int(s), n)
    return out.to(device)


def fresh_uniforms(
    rngs: Sequence[RowRandom | None],
    n: int,
    *,
    only: torch.Tensor | None = None,
    counts: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(B, n) fresh uniforms from each row's generator: row b draws counts[b] (default n) into its
    first columns. Rows that are greedy or not in `only` (a (B,) bool) draw nothing (zeros), so what
    a row draws never depends on the other rows of the batch."""
    out = torch.zeros(len(rngs), n, dtype=torch.float64)
    flags = only.tolist() if only is not None else [True] * len(rngs)
    for b, r in enumerate(rngs):
        m = n if counts is None else int(counts[b])
        if r is not None and flags[b] and m > 0:
            out[b, :m] = r.fresh(m)
    return out.to(device)


# --- logits processing ------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchParams:
    """SamplingParams of a batch as (B,) tensors (greedy rows have temperature 0)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor

    @classmethod
    def of(cls, params: Sequence[SamplingParams | None], device: torch.device | str = "cpu") -> BatchParams:
        ps = [p if p is not None else SamplingParams(temperature=0.0) for p in params]

        def t(vals: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(vals, dtype=dtype, device=device)

        return cls(
            t([float(p.temperature) for p in ps], torch.float64),
            t([p.top_k for p in ps], torch.long),
            t([float(p.top_p) for p in ps], torch.float64),
            t([float(p.min_p) for p in ps], torch.float64),
        )

    def select(self, rows: torch.Tensor | Sequence[int]) -> BatchParams:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.temperature.device)
        return BatchParams(self.temperature[idx], self.top_k[idx], self.top_p[idx], self.min_p[idx])


def process_logits(logits: torch.Tensor, params: BatchParams) -> torch.Tensor:
    """Logits (B, ..., V) -> normalised probabilities (B, ..., V), row b processed with row b's params.

    Computed in float64 for float64 logits, else float32. Temperature-0 rows become one-hot on the
    argmax (first index among ties, like torch.argmax). Tokens with logit -inf (the mask id) keep
    probability 0. top-k and top-p always keep the most likely token, so no row ends up empty.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    B, V = x.shape[0], x.shape[-1]
    view = (B,) + (1,) * (x.dim() - 1)
    temp = params.temperature.to(dtype).view(view)
    greedy = temp == 0
    probs = torch.softmax(x / torch.where(greedy, torch.ones_like(temp), temp), dim=-1)
    top_k, top_p = params.top_k.view(view), params.top_p.to(dtype).view(view)
    if bool(((params.top_k > 0) & (params.top_k < V)).any()) or bool((params.top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(V, device=x.device)
        keep = (top_k <= 0) | (rank < top_k)  # top-k
        kept = sorted_p * keep
        mass_before = kept.cumsum(-1) - kept  # mass of more likely tokens, within the top-k
        keep = keep & ((top_p >= 1) | (mass_before < top_p * kept.sum(-1, keepdim=True)))  # nucleus
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    if bool((params.min_p > 0).any()):
        min_p = params.min_p.to(dtype).view(view)
        probs = torch.where(probs >= min_p * probs.amax(-1, keepdim=True), probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter(-1, top1(x)[..., None], 1.0)
        probs = torch.where(greedy, onehot, probs)
    return probs


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (..., V) (need not sum exactly to 1), u (...) in [0, 1) -> tokens (...).

    Returns the smallest index whose cumulative mass exceeds u * total, so tokens of probability 0
    are never drawn. Deterministic given (probs, u).
    """
    cdf = probs.to(torch.float64).cumsum(-1)
    target = (u.to(torch.float64) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


# --- acceptance rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """Outcome of one verify step for a batch.

    accepted: (B,) drafts accepted, in [0, n]. tokens: (B, n + 1); row b emits tokens[b, :accepted[b] + 1]
    (the accepted drafts, then the recovered or bonus token). recovered: (B,) True where the last
    emitted token was recovered after a rejection, False where it is the bonus (all n accepted).
    """

    accepted: torch.Tensor
    tokens: torch.Tensor
    recovered: torch.Tensor


def _prefix_len(ok: torch.Tensor) -> torch.Tensor:
    """(B, n) bool -> (B,) length of the leading run of True."""
    if ok.shape[1] == 0:
        return torch.zeros(ok.shape[0], dtype=torch.long, device=ok.device)
    return ok.long().cumprod(dim=1).sum(dim=1)


def accept_match(drafts: torch.Tensor, p: torch.Tensor, u_sample: torch.Tensor) -> Acceptance:
    """Verify-by-sampling. drafts (B, n); p (B, n + 1, V) processed target distributions, p[:, i]
    for the slot of drafts[:, i] (p[:, n] is the bonus slot); u_sample (B, n + 1) uniforms.

    y_i = sample(p_i, u_i); accept while y_i == d_i; emit y_0..y_c. Valid for any drafts.
    """
    n = drafts.shape[1]
    y = sample(p, u_sample)  # (B, n + 1)
    accepted = _prefix_len(y[:, :n] == drafts)
    return Acceptance(accepted, y, accepted < n)


def accept_rejection(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    u_accept: torch.Tensor,
    u_residual: torch.Tensor,
    u_sample: torch.Tensor,
) -> Acceptance:
    """Leviathan/Chen speculative sampling, batched.

    drafts (B, n), each drawn from q (B, n, V); p (B, n + 1, V) target distributions, p[:, i] for
    the slot of drafts[:, i] given drafts[:, :i]; uniforms u_accept (B, n), u_residual (B, n),
    u_sample (B, n + 1) (only u_sample[:, n] is used: the bonus). Draft i is accepted iff
    u_accept_i * q_i(d_i) < p_i(d_i) (probability min(1, p/q)); the recovered token at the first
    rejection i is sample(max(0, p_i - q_i), u_residual_i); the bonus is sample(p_n, u_sample_n).
    """
    B, n = drafts.shape
    if n == 0:
        bonus = sample(p[:, 0], u_sample[:, 0])[:, None]
        return Acceptance(torch.zeros(B, dtype=torch.long, device=drafts.device), bonus,
                          torch.zeros(B, dtype=torch.bool, device=drafts.device))
    pd = p[:, :n].gather(-1, drafts[..., None]).squeeze(-1).to(torch.float64)  # (B, n)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1).to(torch.float64)
    accepted = _prefix_len(u_accept * qd < pd)
    residual = (p[:, :n].to(torch.float64) - q.to(torch.float64)).clamp(min=0)  # (B, n, V)
    # A rejection needs p(d) < q(d) somewhere, so the residual has mass; the guard only catches p == q
    # up to rounding, where falling back to p keeps the sample well defined.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p[:, :n].to(torch.float64), residual)
    recovered_tok = sample(residual, u_residual)  # (B, n)
    bonus = sample(p[:, n], u_sample[:, n])  # (B,)
    fix = torch.cat([recovered_tok, bonus[:, None]], dim=1)  # (B, n + 1): token emitted if stopping at i
    tokens = torch.cat([drafts, bonus[:, None]], dim=1)
    at = accepted[:, None]
    tokens = tokens.scatter(1, at, fix.gather(1, at))
    return Acceptance(accepted, tokens, accepted < n)


def accept(
    drafts: torch.Tensor,
    p: torch.Tensor,
    u: torch.Tensor,
    *,
    q: torch.Tensor | None = None,
    rejection: torch.Tensor | None = None,
) -> Acceptance:
    """Per-row rule: `rejection` (B,) bool picks Leviathan/Chen for its rows (needs q), the others
    verify by sampling. u: (B, n + 1, N_STREAMS) position-keyed uniforms of the n + 1 slots."""
    n = drafts.shape[1]
    m = accept_match(drafts, p, u[:, :, U_SAMPLE])
    if rejection is None or q is None or not bool(rejection.any()):
        return m
    r = accept_rejection(drafts, q, p, u[:, :n, U_ACCEPT], u[:, :n, U_RESIDUAL], u[:, :, U_SAMPLE])
    sel = rejection.to(drafts.device)
    return Acceptance(
        torch.where(sel, r.accepted, m.accepted),
        torch.where(sel[:, None], r.tokens, m.tokens),
        torch.where(sel, r.recovered, m.recovered),
    )


# --- what a decoder needs per step ---------------------------------------------------------------


class BatchSampler:
    """The sampling side of one decoder step for a batch of rows, in batch order.

    params[b] None (or temperature 0) means greedy: that row takes exactly the argmax path.
    rngs[b] is row b's RowRandom (None for greedy rows). independent_draft: the decoder's drafts are
    one-pass independent samples with recorded q (see `resolve_rule`).
    """

    def __init__(
        self,
        params: Sequence[SamplingParams | None],
        rngs: Sequence[RowRandom | None],
        *,
        independent_draft: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        self.rngs = list(rngs)
        self.device = device
        self.rules = [resolve_rule(p, independent_draft=independent_draft) for p in params]
        self.sampled = torch.tensor([r != "greedy" for r in self.rules], dtype=torch.bool, device=device)
        self.rejection = torch.tensor([r == "rejection" for r in self.rules], dtype=torch.bool, device=device)
        self.any = bool(self.sampled.any())
        self.any_rejection = bool(self.rejection.any())
        self.params = BatchParams.of(params, device=device)

    def uniforms(self, starts: Sequence[int], n: int) -> torch.Tensor:
        """(B, n, N_STREAMS) uniforms of generated tokens starts[b] .. starts[b] + n - 1."""
        if not self.any:
            return torch.zeros(len(self.rngs), n, N_STREAMS, dtype=torch.float64, device=self.device)
        return uniforms_at(self.rngs, starts, n, device=self.device)

    def fresh(self, n: int, only: torch.Tensor | None = None, counts: Sequence[int] | None = None) -> torch.Tensor:
        """(B, n) fresh uniforms for the sampled rows in `only`, counts[b] for row b (diffusion mode)."""
        return fresh_uniforms(self.rngs, n, only=only, counts=counts, device=self.device)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed distributions (B, ..., V) (one-hot argmax for greedy rows)."""
        return process_logits(logits, self.params)

    def choose(self, logits: torch.Tensor, u: torch.Tensor, *, want_probs: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B, ...) for masked logits (B, ..., V): argmax for greedy rows, sample(processed, u)
        for sampled rows (u: (B, ...) uniforms). Also returns the processed distributions when asked."""
        greedy_tok = top1(logits)
        if not self.any:
            return greedy_tok, (self.probs(logits) if want_probs else None)
        probs = self.probs(logits)
        view = (-1,) + (1,) * (greedy_tok.dim() - 1)
        tok = torch.where(self.sampled.view(view), sample(probs, u), greedy_tok)
        return tok, (probs if want_probs else None)

    def propose(self, logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Diffusion proposals for masked logits (B, n, V): (proposal, confidence, probs), each (B, n)
        but probs (B, n, V). Greedy rows propose the argmax, confident as its softmax probability;
        sampled rows a sample (uniforms u (B, n)) of the processed distribution, confident as the
        sample's processed probability (probs: the distribution each proposal came from)."""
        probs = logits.float().softmax(-1)
        conf, proposal = probs.max(-1)
        if not self.any:
            return proposal, conf, probs
        sp = self.probs(logits)
        drawn = sample(sp, u)
        pick = self.sampled[:, None]
        proposal = torch.where(pick, drawn, proposal)
        conf = torch.where(pick, sp.gather(-1, drawn[..., None]).squeeze(-1).to(conf.dtype), conf)
        return proposal, conf, torch.where(pick[..., None], sp.to(probs.dtype), probs)

    def verify(self, drafts: torch.Tensor, logits: torch.Tensor, u: torch.Tensor,
               q: torch.Tensor | None = None) -> Acceptance:
        """Acceptance for every row: drafts (B, n), masked verifier logits (B, n + 1, V) (slot i
        predicts the token drafts[:, i] proposes; slot n the bonus), u (B, n + 1, N_STREAMS), q (B, n, V)
        the drafts' recorded processed distributions (needed for rows using rejection). When no row
        samples this is greedy verification: the verifier's argmax, accepted while it equals the draft."""
        if not self.any:
            tokens = top1(logits)
            accepted = _prefix_len(tokens[:, : drafts.shape[1]] == drafts)
            return Acceptance(accepted, tokens, accepted < drafts.shape[1])
        p = self.probs(logits)
        return accept(drafts, p, u, q=q, rejection=self.rejection if q is not None else None)
