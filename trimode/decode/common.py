"""Shared decoding machinery: configuration, per-row state and counters, prefill, helpers.

Every decoder is a generator `run(model, rows, cfg) -> Iterator[Step]` that yields one `Step` per
model forward. `Rows` owns what each row has produced and why it stopped; decoders only ask it what
is still active and hand it tokens through `emit`, which applies EOS, stop tokens and the token
budget in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import masks

# Forward kinds, the vocabulary of every counter.
PREFILL, AR_STEP, DRAFT, VERIFY, DENOISE, COMMIT, QUADRATIC = (
    "prefill", "ar", "draft", "verify", "denoise", "commit", "quadratic",
)
FORWARD_KINDS = (PREFILL, AR_STEP, DRAFT, VERIFY, DENOISE, COMMIT, QUADRATIC)
EMIT = "emit"  # a Step that hands out tokens without running a forward

# A hook that may replace proposed draft tokens (B, n): stub drafters in tests, oracles in benchmarks.
# drafts[b, i] is the proposal for row b's generated token number len(generated[b]) + i.
DraftOverride = Callable[[torch.Tensor, Sequence[Sequence[int]]], torch.Tensor]


@dataclass(frozen=True)
class DecodeConfig:
    """Per-call decoding options, validated once. (EOS and stop ids live in `Rows.stop_ids`.)"""

    max_new_tokens: int
    block_len: int = 32
    threshold: float | None = 0.9  # diffusion: confidence threshold; None = even schedule
    steps: int | None = None  # diffusion even schedule: denoising forwards per block (default block_len - 1)
    draft_adapter: str | None = "draft"  # used in draft passes when the model has it
    draft_override: DraftOverride | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.block_len, int) or self.block_len < 1:
            raise ValueError(f"block_len must be an integer >= 1, got {self.block_len!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (or be None), got {self.threshold!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")


@dataclass
class Step:
    """One model forward (or, with kind EMIT, no forward): its kind and the tokens each row
    finalised with it (empty lists for rows that finalised nothing, None for rows that did not
    take part)."""

    kind: str
    new_tokens: list[list[int] | None]


class Rows:
    """What each row of a batch has produced, its counters, and whether it is finished."""

    def __init__(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int]
    ) -> None:
        self.prompts = [list(p) for p in prompts]
        B = len(self.prompts)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(int(s) for s in stop_ids)
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.done = [False] * B
        self.finish_reason: list[str | None] = [None] * B
        # trace[b]: one [kind, tokens finalised] entry per forward that row b took part in.
        self.trace: list[list[list]] = [[] for _ in range(B)]

    @property
    def size(self) -> int:
        return len(self.prompts)

    def active(self) -> list[int]:
        return [b for b in range(self.size) if not self.done[b]]

    def active_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([not d for d in self.done], dtype=torch.bool, device=device)

    def remaining(self, b: int) -> int:
        return self.max_new_tokens - len(self.tokens[b])

    def forward(self, kind: str, only: Sequence[int] | None = None) -> list[int]:
        """Record one forward for every active row (or the active rows in `only`); returns them."""
        rows = self.active() if only is None else [b for b in only if not self.done[b]]
        for b in rows:
            self.trace[b].append([kind, 0])
        return rows

    def emit(self, b: int, toks: Sequence[int], credit: Sequence[int] | None = None) -> list[int]:
        """Append tokens to row b until EOS / a stop token / the budget; return what was kept.

        credit[i], when given, is the index in trace[b] of the forward that finalised toks[i]
        (diffusion fills a block over several forwards); otherwise the row's last forward is credited.
        """
        kept: list[int] = []
        if self.done[b]:
            return kept
        for i, t in enumerate(toks):
            t = int(t)
            if t in self.stop_ids:
                self.done[b], self.finish_reason[b] = True, "stop"
                break
            kept.append(t)
            self.tokens[b].append(t)
            self.trace[b][credit[i] if credit is not None else -1][1] += 1
            if len(self.tokens[b]) >= self.max_new_tokens:
                self.done[b], self.finish_reason[b] = True, "length"
                break
        return kept


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


def cache_capacity(rows: Rows, scratch: int) -> int:
    """Slots for the longest prompt, every new token, and the widest forward's scratch entries
    (the last forward may write `scratch` entries past the committed tokens)."""
    longest = max(len(p) for p in rows.prompts)
    return longest + rows.max_new_tokens + scratch + 1


def pad_prompts(rows: Rows, extra: int, fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts to one (B, max P + extra) tensor; returns it and the lengths (B,)."""
    lengths = torch.tensor([len(p) for p in rows.prompts], dtype=torch.long, device=device)
    T = int(lengths.max()) + extra
    tokens = torch.full((rows.size, T), fill, dtype=torch.long, device=device)
    for b, p in enumerate(rows.prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    return tokens, lengths


def prefill(
    model: torch.nn.Module,
    rows: Rows,
    cache,
    *,
    draft_len: int = 0,
    mask_id: int | None = None,
    adapter: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal prefill of ragged prompts (right-padded, per-row commit), optionally fused with a draft.

    With draft_len = k > 0 each row's prompt is followed by k mask tokens that see the whole prompt
    and each other (the draft adapter acts on them only); their K/V are scratch and dropped.
    Returns the first token per row (B,) and, with a draft, k - 1 draft proposals (B, k - 1) for
    the tokens after it. Commits each row's prompt.
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
    first = logits[:, 0].argmax(-1)
    drafts = logits[:, 1:].argmax(-1) if draft_len > 1 else None
    return first, drafts


def apply_override(cfg: DecodeConfig, drafts: torch.Tensor, rows: Rows) -> torch.Tensor:
    if cfg.draft_override is None:
        return drafts
    out = cfg.draft_override(drafts, rows.tokens)
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
