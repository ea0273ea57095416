"""Shared decoding machinery: configuration, per-row state and counters, prefill, helpers.

Every decoder is a generator `run(model, rows, cfg) -> Iterator[Step]` that yields one `Step` per
model forward. `Rows` owns what each row has produced and why it stopped; decoders only ask it what
is still active and hand it tokens through `emit`, which applies EOS, stop tokens and the token
budget in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .. import masks
from ..sampling import U_DRAFT, U_SAMPLE, BatchSampler, RowRandom, SamplingParams

# Forward kinds, the vocabulary of every counter.
PREFILL, AR_STEP, DRAFT, VERIFY, DENOISE, COMMIT, QUADRATIC = (
    "prefill", "ar", "draft", "verify", "denoise", "commit", "quadratic",
)
FORWARD_KINDS = (PREFILL, AR_STEP, DRAFT, VERIFY, DENOISE, COMMIT, QUADRATIC)
EMIT = "emit"  # a Step that hands out tokens without running a forward

# A hook that may replace proposed draft tokens (B, n): stub drafters in tests, oracles in benchmarks.
# drafts[b, i] is the proposal for rows[b]'s generated token number len(rows[b].tokens) + i; rows[b] is
# the `Row` in batch position b (rows[b].index: its position in the caller's prompt list).
DraftOverride = Callable[[torch.Tensor, Sequence["Row"]], torch.Tensor]


@dataclass(frozen=True)
class DecodeConfig:
    """Options shared by every row of one decoder, validated once. (EOS / stop ids and the token
    budget are per row: `Row.stop_ids`, `Row.max_new_tokens`; `max_new_tokens` here is the default.)"""

    max_new_tokens: int
    block_len: int = 32
    threshold: float | None = 0.9  # diffusion: confidence threshold; None = even schedule
    steps: int | None = None  # diffusion even schedule: denoising forwards per block (default block_len - 1)
    draft_adapter: str | None = "draft"  # used in draft passes when the model has it
    draft_override: DraftOverride | None = field(default=None, compare=False)
    policy: object | None = field(default=None, compare=False)  # diffusion unmasking policy (overrides threshold)
    tree_nodes: int = 0  # linear, greedy batches: verify a best-first tree of this many draft nodes (0: a chain)
    tree_branch: int = 3  # candidates per slot when growing the tree

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.block_len, int) or self.block_len < 1:
            raise ValueError(f"block_len must be an integer >= 1, got {self.block_len!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (or be None), got {self.threshold!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if not isinstance(self.tree_nodes, int) or isinstance(self.tree_nodes, bool) or self.tree_nodes < 0:
            raise ValueError(f"tree_nodes must be an integer >= 0, got {self.tree_nodes!r}")
        if not isinstance(self.tree_branch, int) or isinstance(self.tree_branch, bool) or self.tree_branch < 1:
            raise ValueError(f"tree_branch must be an integer >= 1, got {self.tree_branch!r}")
        if self.policy is not None and not callable(getattr(self.policy, "select", None)):
            raise ValueError(f"policy must have a select(conf, candidates, step, ctx) method, got {self.policy!r}")


class Row:
    """One request: its prompt, budget, stop ids, what it has produced, its counters, and whether
    it is finished. Decoders move rows in and out of batches; a row's state travels with it."""

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
        # Set by the decoder at admit: "greedy" | "match" | "rejection" (speculative modes), else None.
        self.acceptance_rule: str | None = None
        # Decoder scratch: the processed distributions (n, V) the row's pending drafts were sampled
        # from, kept only for rows verifying with the rejection rule.
        self.draft_q: torch.Tensor | None = None
        self.tokens: list[int] = []
        self.done = False
        self.finish_reason: str | None = None
        # trace: one [kind, tokens kept] entry per forward this row took part in; a verifying forward
        # (VERIFY, QUADRATIC) adds the verifier's acceptance length: [kind, kept, accepted]. Kept
        # counts what `emit` appended (EOS / stop tokens and tokens past the budget are not kept);
        # accepted is what the verifier decided (see trimode.decode.stats).
        self.trace: list[list] = []

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
            self.trace[credit[i] if credit is not None else -1][1] += 1
            if len(self.tokens) >= self.max_new_tokens:
                self.done, self.finish_reason = True, "length"
                break
        return kept

    def stats(self, mode: str) -> dict:
        from .stats import row_stats

        st = row_stats(self.trace, len(self.tokens), mode=mode)
        sampled = self.rng is not None
        st["temperature"] = float(self.sampling.temperature) if sampled else 0.0
        st["seed"] = self.rng.seed if sampled else None
        st["acceptance_rule"] = self.acceptance_rule
        st["acceptance_requested"] = self.sampling.acceptance if sampled and self.acceptance_rule else None
        return st


@dataclass
class Step:
    """One model forward (or, with kind EMIT, no forward): its kind and the tokens each row
    finalised with it. new_tokens[i] belongs to rows[i] (an empty list: it finalised nothing; None:
    it did not take part). `generate`-level streams index new_tokens by the caller's prompt order."""

    kind: str
    new_tokens: list[list[int] | None]
    rows: Sequence[Row] = ()


def record(rows: Sequence[Row], kind: str, only: Sequence[bool] | None = None,
           accepted: Sequence[int] | None = None) -> list[int]:
    """Count one forward for every row still decoding (and, with `only`, selected); return their indices.

    accepted[i], for a verifying forward, is the acceptance length the verifier decided for rows[i]
    (accepted drafts + 1, the bonus or recovered token), before EOS, stop tokens or the budget cut the
    emission short; it becomes the entry's third field. Call before `emit` (it credits the entry)."""
    took = [i for i, r in enumerate(rows) if not r.done and (only is None or only[i])]
    for i in took:
        rows[i].trace.append([kind, 0] if accepted is None else [kind, 0, int(accepted[i])])
    return took


def active_mask(rows: Sequence[Row], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([not r.done for r in rows], dtype=torch.bool, device=device)


class Rows:
    """The rows of one `generate` call, in prompt order (a thin view over `Row` objects)."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_ids: Iterable[int],
        sampling: Sequence[SamplingParams | None] | None = None,
    ) -> None:
        stop = frozenset(int(s) for s in stop_ids)
        params = list(sampling) if sampling is not None else [None] * len(prompts)
        self.rows = [Row(p, max_new_tokens=max_new_tokens, stop_ids=stop, index=i, sampling=sp)
                     for i, (p, sp) in enumerate(zip(prompts, params))]
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def prompts(self) -> list[list[int]]:
        return [r.prompt for r in self.rows]

    @property
    def tokens(self) -> list[list[int]]:
        return [r.tokens for r in self.rows]

    @property
    def done(self) -> list[bool]:
        return [r.done for r in self.rows]

    @property
    def finish_reason(self) -> list[str | None]:
        return [r.finish_reason for r in self.rows]

    @property
    def trace(self) -> list[list[list]]:
        return [r.trace for r in self.rows]

    def active(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if not r.done]


def exclude_mask(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """The mask id is never a prediction: give it -inf before argmax / softmax."""
    if mask_id is None:
        return logits
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return logits


def pred_slots(slots: torch.Tensor, dlm_type: str) -> torch.Tensor:
    """Slots whose logits predict the tokens at `slots` in a diffusion pass.

    llada: a position predicts itself; dream: the logits at slot i predict slot i + 1.
    """
    return slots if dlm_type == "llada" else slots - 1


def clamp_positions(positions: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Lookahead slots past the context only ever feed drafts that get verified or discarded."""
    return positions.clamp(max=max_seq_len - 1)


def cache_capacity(rows: Sequence[Row], scratch: int) -> int:
    """Slots for each row's prompt and every new token it may make, plus the widest forward's
    scratch entries (the last forward may write `scratch` entries past the committed tokens)."""
    need = max(len(r.prompt) + r.max_new_tokens for r in rows)
    return need + scratch + 1


def pad_prompts(
    rows: Sequence[Row], extra: int, fill: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts to one (B, max P + extra) tensor; returns it and the lengths (B,)."""
    lengths = torch.tensor([len(r.prompt) for r in rows], dtype=torch.long, device=device)
    T = int(lengths.max()) + extra
    tokens = torch.full((len(rows), T), fill, dtype=torch.long, device=device)
    for b, p in enumerate(r.prompt for r in rows):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    return tokens, lengths


def prefill(
    model: torch.nn.Module,
    rows: Sequence[Row],
    cache,
    *,
    draft_len: int = 0,
    mask_id: int | None = None,
    adapter: str | None = None,
    sampler: BatchSampler | None = None,
    fresh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Causal prefill of ragged prompts (right-padded, per-row commit), optionally fused with a draft.

    With draft_len = k > 0 each row's prompt is followed by k mask tokens that see the whole prompt
    and each other (the draft adapter acts on them only); their K/V are scratch and dropped.
    Returns the first token per row (B,), with a draft k - 1 draft proposals (B, k - 1) for the
    tokens after it, and the processed distributions they were drawn from (B, k - 1, V) when some row
    verifies with the rejection rule (else None). Commits each row's prompt.

    sampler: sampled rows draw the first token from their processed distribution (uniform of token
    0, or a fresh one with `fresh`, as diffusion mode does) and each draft independently from its
    slot's processed marginal (draft uniforms of tokens 1..k-1); greedy rows take the argmax.
    """
    dev = model.device
    c = model.config
    fill = mask_id if (draft_len and mask_id is not None) else 0
    tokens, lengths = pad_prompts(rows, draft_len, fill, dev)
    B, T = tokens.shape
    positions = clamp_positions(torch.arange(T, device=dev).expand(B, T), c.max_seq_len)
    last = lengths - 1  # (B,)
    if draft_len:
        ar = torch.arange(draft_len, device=dev)[None, :]
        slots = lengths[:, None] + ar  # (B, k): the mask block (pad_prompts already filled it with mask ids)
        mask = masks.segments(lengths, draft_len, T, device=dev)
        want = torch.cat([last[:, None], pred_slots(slots[:, 1:], c.dlm_type)], dim=1)  # (B, k)
        in_block = (torch.arange(T, device=dev)[None, :] >= lengths[:, None]) & (
            torch.arange(T, device=dev)[None, :] < lengths[:, None] + draft_len
        )
        logits = model(tokens, positions, mask=mask, cache=cache, adapter=adapter,
                       adapter_tokens=in_block, logits_at=want)
    else:
        logits = model(tokens, positions, mask=masks.causal(T, device=dev), cache=cache, logits_at=last[:, None])
    cache.commit(lengths)
    logits = exclude_mask(logits, mask_id)
    if sampler is None or not sampler.any:
        first = logits[:, 0].argmax(-1)
        drafts = logits[:, 1:].argmax(-1) if draft_len > 1 else None
        return first, drafts, None
    if fresh:
        first, _ = sampler.choose(logits[:, 0], sampler.fresh(1)[:, 0])
    else:
        u = sampler.uniforms([len(r.tokens) for r in rows], max(draft_len, 1))  # (B, k, streams)
        first, _ = sampler.choose(logits[:, 0], u[:, 0, U_SAMPLE])
    drafts = q = None
    if draft_len > 1:
        drafts, q = sampler.choose(logits[:, 1:], u[:, 1:, U_DRAFT], want_probs=sampler.any_rejection)
    return first, drafts, q


def stack_draft_q(rows: Sequence[Row], sampler: BatchSampler, n: int, vocab: int, *, dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor | None:
    """(B, n, V) recorded draft distributions of the rows verifying by rejection (zeros where a row
    has none, e.g. it will draft this cycle), or None when no row verifies by rejection."""
    if not sampler.any_rejection or n == 0:
        return None
    q = torch.zeros(len(rows), n, vocab, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if r.draft_q is not None and sampler.rules[i] == "rejection":
            q[i] = r.draft_q[:n]
    return q


def probs_dtype(model: torch.nn.Module) -> torch.dtype:
    """dtype of processed distributions (`trimode.sampling.process_logits`) for this model's logits."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def keep_draft_q(rows: Sequence[Row], sampler: BatchSampler, q: torch.Tensor | None) -> None:
    """Store each rejection row's recorded draft distributions on the row (they travel with it)."""
    for i, r in enumerate(rows):
        r.draft_q = q[i] if q is not None and sampler.rules[i] == "rejection" else None


def apply_override(cfg: DecodeConfig, drafts: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    if cfg.draft_override is None:
        return drafts
    out = cfg.draft_override(drafts, rows)
    if out.shape != drafts.shape:
        raise ValueError(f"draft_override returned shape {tuple(out.shape)}, expected {tuple(drafts.shape)}")
    return out.to(drafts.device, drafts.dtype)


def adapter_for(model: torch.nn.Module, cfg: DecodeConfig) -> str | None:
    """The draft adapter name if the model carries it, else None (base weights draft)."""
    name = cfg.draft_adapter
    if name is None:
        return None
    has = getattr(model, "adapter_names", None)
    if callable(has):
        return name if name in has() else None
    return None
