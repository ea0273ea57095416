"""The step-level decoder: a batch of rows that requests join and leave between cycles.

A `Decoder` owns one KV cache and a typed state of per-row tensors (first dimension = batch
position) for the rows in `running`. `admit(rows)` runs one prefill forward for the new rows on a
cache of their own and stacks it under the running batch; `cycle()` runs one decoding cycle (one
forward for ar and quadratic, draft + verify for linear, a whole block for diffusion). Finished and
cancelled rows are dropped after every admit and cycle, so their cache rows are freed and they cost
no more compute. This is the continuous-batching unit the server drives; `generate` is
admit-all-then-cycle.

Every decoder takes tokens through one `BatchSampler` (`choose`, `verify`): a greedy row is the
temperature-0 case of the sampled path, and the sampler takes the argmax fast path when no row of
the batch samples. `finish` records which rows took part in a forward, emits what they finalised
and builds the `Step`, so a mode's `_cycle` only says which tokens go in and what comes out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import masks
from ..cache import KVCache
from ..config import ModelConfig
from ..sampling import U_DRAFT, U_SAMPLE, BatchSampler, resolve_rule
from .rows import Row, Step

# A hook that may replace proposed draft tokens (B, n): stub drafters in tests, oracles in benchmarks.
# drafts[b, i] is the proposal for rows[b]'s generated token number len(rows[b].tokens) + i; rows[b] is
# the `Row` in batch position b (rows[b].index: its position in the caller's prompt list).
DraftOverride = Callable[[torch.Tensor, Sequence[Row]], torch.Tensor]


DRAFTERS = ("auto", "adapter", "feature")


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
    tree_min_prob: float = 0.0  # feature drafter trees: stop drafting deeper once no frontier path is this likely
    drafter: str = "auto"  # linear: "adapter" (a draft pass of the model), "feature" (its feature drafter), "auto"
    lookup: bool = True  # linear with the feature drafter, greedy trees: add the prompt-lookup continuation as a path
    datastore: bool = True  # the same, with the feature drafter's datastore continuation (when it has one)

    def __post_init__(self) -> None:
        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not is_int(self.block_len) or self.block_len < 1:
            raise ValueError(f"block_len must be an integer >= 1, got {self.block_len!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (or be None), got {self.threshold!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if not is_int(self.tree_nodes) or self.tree_nodes < 0:
            raise ValueError(f"tree_nodes must be an integer >= 0, got {self.tree_nodes!r}")
        if not is_int(self.tree_branch) or self.tree_branch < 1:
            raise ValueError(f"tree_branch must be an integer >= 1, got {self.tree_branch!r}")
        if not isinstance(self.tree_min_prob, (int, float)) or isinstance(self.tree_min_prob, bool) \
                or not 0.0 <= self.tree_min_prob < 1.0:
            raise ValueError(f"tree_min_prob must lie in [0, 1), got {self.tree_min_prob!r}")
        for name in ("lookup", "datastore"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")
        if self.policy is not None and not callable(getattr(self.policy, "select", None)):
            raise ValueError(f"policy must have a select(conf, candidates, step, ctx) method, got {self.policy!r}")


def validate_rows(model: DecodableModel, rows: Sequence[Row], *, needs_mask: bool) -> None:
    """Raise ValueError for a request the model cannot serve (the server maps it to a 400)."""
    c = model.config
    if needs_mask and c.mask_token_id is None:
        raise ValueError("this mode needs a mask token, but the model config has mask_token_id=None")
    for r in rows:
        p = r.prompt
        if len(p) == 0:
            raise ValueError(f"prompt {r.index} is empty")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"prompt {r.index} has token ids outside [0, {c.vocab_size}): {bad[:5]}")
        if not isinstance(r.max_new_tokens, int) or isinstance(r.max_new_tokens, bool) or r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {r.max_new_tokens!r}")
        if len(p) + r.max_new_tokens > c.max_seq_len:
            raise ValueError(
                f"prompt {r.index} has {len(p)} tokens; with max_new_tokens={r.max_new_tokens} it exceeds "
                f"the context of {c.max_seq_len} tokens"
            )
        bad = [t for t in r.stop_ids if not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"stop token ids must lie in [0, {c.vocab_size}), got {sorted(bad)[:5]}")


# -- small pure helpers ----------------------------------------------------------------------------
def exclude_mask(logits: torch.Tensor, mask_id: int | None, *, inplace: bool = False) -> torch.Tensor:
    """The mask id is never a prediction: give it -inf before argmax / softmax (in place when the
    caller owns `logits`, e.g. a fresh head output: saves copying a (T, vocab) tensor)."""
    if mask_id is None:
        return logits
    if not inplace:
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


class DecodableModel(Protocol):
    """What a decoder asks of the model (`trimode.model.Transformer`, or a wrapper such as the
    benchmark's TimedModel): one call per forward, the output head on its own, a cache factory."""

    config: ModelConfig
    device: torch.device

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                 mask: torch.Tensor | None = None, cache: KVCache | None = None, adapter: str | None = None,
                 adapter_tokens: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                 hidden: bool = False, inputs_embeds: torch.Tensor | None = None) -> Any: ...

    def head(self, h: torch.Tensor, *, adapter: str | None = None, gate: torch.Tensor | None = None
             ) -> torch.Tensor: ...

    def new_cache(self, batch_size: int, capacity: int) -> KVCache: ...

    def adapter_names(self) -> set[str]: ...


def adapter_for(model: DecodableModel, name: str | None) -> str | None:
    """`name` if the model carries that adapter, else None (base weights draft)."""
    return name if name is not None and name in model.adapter_names() else None


# -- per-mode state ------------------------------------------------------------------------------
@dataclass
class State:
    """Per-row decoder state: every field a tensor with one row per running row, or None.

    Joining and leaving are generic: `cat` stacks two states (a None field on one side becomes zeros
    shaped like the other side's rows), `select` keeps some rows."""

    def select(self, idx: torch.Tensor) -> State:
        def pick(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v.index_select(0, idx.to(v.device))

        return dataclasses.replace(self, **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def cat(self, other: State) -> State:
        def both(a: torch.Tensor | None, b: torch.Tensor | None, nb: int) -> torch.Tensor | None:
            if a is None and b is None:
                return None
            if a is None or b is None:
                t = a if a is not None else b
                zeros = t.new_zeros((self.size if a is None else nb,) + tuple(t.shape[1:]))
                a, b = (zeros, b) if a is None else (a, zeros)
            return torch.cat([a, b])

        return dataclasses.replace(self, **{f.name: both(getattr(self, f.name), getattr(other, f.name), other.size)
                                            for f in dataclasses.fields(self)})

    @property
    def size(self) -> int:
        return next(v.shape[0] for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None)


class Decoder:
    """Base class: batch bookkeeping. Subclasses implement `scratch`, `_prefill` and `_cycle`."""

    needs_mask: bool = True
    speculative: bool = False  # verifies drafts (linear, quadratic): rows get an acceptance rule

    def __init__(self, model: DecodableModel, cfg: DecodeConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.c = model.config
        self.dev = model.device
        self.adapter = adapter_for(model, cfg.draft_adapter)
        self.running: list[Row] = []
        self.cache: KVCache | None = None
        self.state: State | None = None
        # Draft vocabulary (Transformer.set_draft_vocab): the ids of the rows' prompts and outputs
        # that it lacks, so drafts can copy them; per row, how many of its tokens were looked at.
        self._seen: torch.Tensor | None = None
        self._scanned: dict[int, tuple[Row, int]] = {}
        self._extra: torch.Tensor | None = None

    # -- subclass hooks -----------------------------------------------------------------------------
    def scratch(self) -> int:
        """Cache slots the widest forward of this mode writes past the committed tokens."""
        raise NotImplementedError

    def _prefill(self, rows: list[Row], cache: KVCache) -> tuple[list[Step], State]:
        raise NotImplementedError

    def _cycle(self) -> list[Step]:
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.running

    def admit(self, rows: Sequence[Row]) -> list[Step]:
        """Prefill new rows (one forward) and add them to the running batch."""
        rows = [r for r in rows if not r.done]
        if not rows:
            return []
        validate_rows(self.model, rows, needs_mask=self.needs_mask)
        for r in rows:
            r.acceptance_rule = (resolve_rule(r.sampling, independent_draft=self.independent_draft())
                                 if self.speculative else None)
        need = max(len(r.prompt) + r.max_new_tokens for r in rows)  # + the widest forward's scratch
        cache = self.model.new_cache(len(rows), need + self.scratch() + 1)
        steps, state = self._prefill(rows, cache)
        if self.running:
            self.cache, self.state = KVCache.cat([self.cache, cache]), self.state.cat(state)
        else:
            self.cache, self.state = cache, state
        self.running = self.running + rows
        self._drop_finished()
        return steps

    def cycle(self) -> list[Step]:
        """One decoding cycle over the running rows (nothing when none is running)."""
        self._drop_finished()
        if not self.running:
            return []
        steps = self._cycle()
        self._drop_finished()
        return steps

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not r.done]
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.state = [], None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.cache.length.device)
        self.cache, self.state = self.cache.select(idx), self.state.select(idx)
        self.running = [self.running[i] for i in keep]

    # -- what cycles share ---------------------------------------------------------------------------
    def independent_draft(self) -> bool:
        """Whether this decoder's drafts are one-pass independent samples from recorded
        distributions (rejection sampling is valid); an external draft_override voids it."""
        return self.speculative and self.cfg.draft_override is None

    def draft_head(self, h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, n, V) of a draft pass's hidden states (the draft adapter's head). With a draft
        vocabulary the model scores its ids plus every token of the running rows' prompts and
        outputs (`Transformer.draft_head`)."""
        f = getattr(self.model, "draft_head", None)
        vocab = getattr(self.model, "draft_vocab", None)
        if f is None or vocab is None:
            return self.model.head(h, adapter=self.adapter, gate=gate)
        return f(h, adapter=self.adapter, gate=gate, extra=self._extra_ids(vocab))

    def _extra_ids(self, vocab: torch.Tensor) -> torch.Tensor | None:
        V = self.c.vocab_size
        if self._seen is None:
            self._seen = torch.zeros(V, dtype=torch.bool)
            self._static = torch.zeros(V, dtype=torch.bool)
            self._static[vocab.cpu()] = True
        if any(ent[0] not in self.running for ent in self._scanned.values()):  # a row left: start over
            self._seen.zero_()
            self._scanned, self._extra = {}, None
        scanned, grew = {}, False
        for r in self.running:
            ent = self._scanned.get(id(r))
            done = ent[1] if ent is not None and ent[0] is r else -1  # -1: the prompt is still to scan
            new = (list(r.prompt) if done < 0 else []) + list(r.tokens[max(done, 0):])
            if new:
                t = torch.tensor(new, dtype=torch.long).clamp_(0, V - 1)
                fresh = ~self._seen[t] & ~self._static[t]
                if bool(fresh.any()):
                    self._seen[t] = True
                    grew = True
            scanned[id(r)] = (r, len(r.tokens))
        self._scanned = scanned
        if grew or self._extra is None:
            self._extra = torch.nonzero(self._seen & ~self._static).flatten().to(self.dev)
        return self._extra if self._extra.numel() else None

    def sampler(self, rows: Sequence[Row] | None = None) -> BatchSampler:
        """The sampling side of a forward over `rows` (default: the running batch)."""
        rows = self.running if rows is None else rows
        return BatchSampler([r.sampling for r in rows], [r.rng for r in rows],
                            independent_draft=self.independent_draft(), device=self.dev)

    def starts(self) -> list[int]:
        """Per running row, the generated-token index of the next token (keys its uniforms)."""
        return [len(r.tokens) for r in self.running]

    def width(self, sampler: BatchSampler) -> int:
        """This cycle's block: block_len, narrowed to the largest remaining budget, except while a
        row verifies by rejection (its recorded q must not depend on its neighbours' budgets)."""
        k = self.cfg.block_len
        return k if sampler.any_rejection else min(k, max(r.remaining() for r in self.running))

    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """(B, T) positions of new tokens at `offsets` (T,) or (B, T) past each row's cache."""
        offs = offsets if offsets.dim() == 2 else offsets[None, :]
        return clamp_positions(self.cache.length[:, None] + offs, self.c.max_seq_len)

    def prefix_mask(self, inner: torch.Tensor) -> torch.Tensor:
        """`inner` (T, T) or (B, T, T) among the new tokens, after each row's whole cached prefix."""
        return masks.with_prefix(inner, self.cache.length, int(self.cache.length.max()) + inner.shape[-1])

    def only_active(self, n: torch.Tensor) -> torch.Tensor:
        """n (B,) where the row is still decoding, else 0 (a finished row commits nothing more)."""
        alive = torch.tensor([not r.done for r in self.running], dtype=torch.bool, device=n.device)
        return torch.where(alive, n, torch.zeros_like(n))

    def override(self, drafts: torch.Tensor) -> torch.Tensor:
        """The draft_override hook's replacement of `drafts` (B, n), if one is set."""
        if self.cfg.draft_override is None:
            return drafts
        out = self.cfg.draft_override(drafts, self.running)
        if out.shape != drafts.shape:
            raise ValueError(f"draft_override returned shape {tuple(out.shape)}, expected {tuple(drafts.shape)}")
        return out.to(drafts.device, drafts.dtype)

    def force(self, tokens: torch.Tensor, n: torch.Tensor | None = None, *,
              rows: Sequence[Row] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the rows' thinking budgets (decode/thinking.py) to the tokens a forward chose,
        tokens[b, :n[b]] for row b: returns (tokens, n), unchanged or with a row's batch cut at the
        token its budget forces (that token replaced). Callers emit, commit and carry on from these."""
        rows = self.running if rows is None else rows
        if n is None:
            n = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
        if not any(r.think is not None for r in rows):
            return tokens, n
        toks, lens, changed = tokens.tolist(), n.tolist(), False
        for i, r in enumerate(rows):
            if r.think is None or r.done or lens[i] < 1:
                continue
            mine = toks[i][: lens[i]]
            new = r.think.plan(mine)
            if new != mine:
                toks[i][: len(new)] = new
                lens[i], changed = len(new), True
        if not changed:
            return tokens, n
        return (torch.tensor(toks, dtype=tokens.dtype, device=tokens.device),
                torch.tensor(lens, dtype=n.dtype, device=n.device))

    def finish(self, kind: str, tokens: torch.Tensor | None = None, n: torch.Tensor | None = None, *,
               rows: Sequence[Row] | None = None, only: torch.Tensor | None = None,
               accepted: torch.Tensor | None = None) -> Step:
        """Record one forward of `kind` for every row still decoding (and in `only`, a (B,) bool);
        emit tokens[b, :n[b]] to each (n default: all); build the Step. `accepted` (B,), for a
        verifying forward, is the acceptance length the verifier decided (the trace's third field)."""
        rows = self.running if rows is None else rows
        flags = [True] * len(rows) if only is None else only.tolist()
        acc = accepted.tolist() if accepted is not None else None
        toks = tokens.tolist() if tokens is not None else None
        lens = n.tolist() if n is not None else None
        out: list[list[int] | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            if r.done or not flags[i]:
                continue
            r.trace.append([kind, 0] if acc is None else [kind, 0, int(acc[i])])
            out[i] = [] if toks is None else r.emit(toks[i] if lens is None else toks[i][: lens[i]])
        return Step(kind, out, rows)


def image_embeds(model: DecodableModel, rows: Sequence[Row], tokens: torch.Tensor) -> torch.Tensor | None:
    """The prefill's input embeddings when some row carries image features (a VLM prompt): the token
    embeddings with each such row's [IMG] slots replaced by its features, in order; else None."""
    if all(r.image_embeds is None for r in rows):
        return None
    tower = getattr(model, "vision", None)
    if tower is None:
        raise ValueError("a prompt carries image features but the model has no vision tower")
    x = model.embed_tokens(tokens)
    img = tower.config.image_token_id
    for b, r in enumerate(rows):
        if r.image_embeds is None:
            continue
        slots = (tokens[b, : len(r.prompt)] == img).nonzero()[:, 0]
        if slots.numel() != r.image_embeds.shape[0]:
            raise ValueError(f"prompt {r.index} has {slots.numel()} image tokens for "
                             f"{r.image_embeds.shape[0]} image features")
        x[b, slots] = r.image_embeds.to(device=x.device, dtype=x.dtype)
    return x


def prefill(dec: Decoder, rows: Sequence[Row], cache: KVCache, sampler: BatchSampler, *, draft_len: int = 0,
            fresh: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Causal prefill of ragged prompts (right-padded, per-row commit), optionally fused with a draft.

    With draft_len = k > 0 each row's prompt is followed by k mask tokens that see the whole prompt
    and each other (the draft adapter acts on them only); their K/V are scratch and dropped.
    Returns the first token per row (B,), with a draft the k - 1 proposals (B, k - 1) for the tokens
    after it, and the processed distributions they were drawn from (B, k - 1, V) when some row
    verifies by rejection (else None). Commits each row's prompt. A sampled row draws the first
    token with the uniform of token 0 (a fresh one with `fresh`, as diffusion mode does) and each
    draft from its slot's processed marginal with the draft uniform of its token.
    """
    c, dev = dec.c, dec.dev
    mask_id = c.mask_token_id
    lengths = torch.tensor([len(r.prompt) for r in rows], dtype=torch.long, device=dev)
    T = int(lengths.max()) + draft_len
    tokens = torch.full((len(rows), T), mask_id if draft_len else 0, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        tokens[b, : len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long, device=dev)
    positions = clamp_positions(torch.arange(T, device=dev).expand(len(rows), T), c.max_seq_len)
    last = (lengths - 1)[:, None]
    extra = {} if (embeds := image_embeds(dec.model, rows, tokens)) is None else {"inputs_embeds": embeds}
    if draft_len:
        slots = lengths[:, None] + torch.arange(draft_len, device=dev)[None, :]  # (B, k): the mask block
        want = torch.cat([last, pred_slots(slots[:, 1:], c.dlm_type)], dim=1)
        col = torch.arange(T, device=dev)[None, :]
        in_block = (col >= lengths[:, None]) & (col < lengths[:, None] + draft_len)
        logits = dec.model(tokens, positions, mask=masks.segments(lengths, draft_len, T, device=dev), cache=cache,
                           adapter=dec.adapter, adapter_tokens=in_block, logits_at=want, **extra)
    else:
        logits = dec.model(tokens, positions, mask=masks.causal(T, device=dev), cache=cache, logits_at=last, **extra)
    cache.commit(lengths)
    logits = exclude_mask(logits, mask_id)
    if fresh:
        return sampler.choose(logits[:, 0], sampler.fresh(1)[:, 0])[0], None, None
    u = sampler.uniforms([len(r.tokens) for r in rows], max(draft_len, 1))  # (B, k, streams)
    first, _ = sampler.choose(logits[:, 0], u[:, 0, U_SAMPLE])
    if draft_len < 2:
        return first, None, None
    drafts, q = sampler.choose(logits[:, 1:], u[:, 1:, U_DRAFT], want_probs=sampler.any_rejection)
    return first, drafts, q
