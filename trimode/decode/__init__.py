"""Decoding: one registry of modes, one `generate`, one step-level `Decoder` per mode.

Modes differ only in which tokens go into the model, which mask is built and what is done with the
logits. Each mode module defines a `Decoder` subclass (see batch.py): `admit(rows)` prefills new
rows into the running batch, `cycle()` runs one decoding cycle. `generate` admits every prompt and
cycles until all are done; a server admits requests between cycles (continuous batching).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..modes import MODE_NAMES, SPECULATIVE_MODES, Mode
from ..sampling import SamplingParams
from .ar import ARDecoder
from .batch import DecodableModel, DecodeConfig, Decoder, DraftOverride, validate_rows
from .diffusion import DiffusionDecoder
from .featdraft import FeatureDraftDecoder, feature_drafter_of
from .linear import LinearDecoder
from .policies import EvenSchedule, JointThreshold, Oracle, PolicyContext, Threshold
from .quadratic import QuadraticDecoder
from .rows import EMIT, FORWARD_KINDS, PREFILL, Row, Step, make_rows

REGISTRY: dict[Mode, type[Decoder]] = {
    Mode.AR: ARDecoder,
    Mode.DIFFUSION: DiffusionDecoder,
    Mode.LINEAR: LinearDecoder,
    Mode.QUADRATIC: QuadraticDecoder,
}


def resolve_drafter(model: DecodableModel, drafter: str) -> str:
    """Linear mode's drafter: "feature" (the model's feature drafter) or "adapter" (a draft pass of the
    model itself); "auto" is "feature" when the model carries one."""
    if drafter == "auto":
        if feature_drafter_of(model) is None:
            return "adapter"
        stored = (getattr(model, "decoding", None) or {}).get("drafter", {}).get("linear")  # measured, decoding.json
        return stored if stored in ("adapter", "feature") else "feature"
    return drafter


def make_decoder(model: DecodableModel, mode: str | Mode, cfg: DecodeConfig) -> Decoder:
    """A step-level decoder for one mode and config; rows join with `admit`, advance with `cycle`."""
    m = Mode.parse(mode)
    if m is Mode.LINEAR and resolve_drafter(model, cfg.drafter) == "feature":
        return FeatureDraftDecoder(model, cfg)
    return REGISTRY[m](model, cfg)


@dataclass
class Generation:
    """New tokens of one prompt (EOS / stop token excluded) and its counters."""

    tokens: list[int]
    nfe: int
    finish_reason: str
    stats: dict = field(default_factory=dict)


def _check_prompts(prompts: object) -> None:
    """The shape of a request; what each prompt may hold is `validate_rows`'s (one rule set)."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {p!r:.60}")


def prepare(
    model: DecodableModel,
    prompts: Sequence[Sequence[int]],
    *,
    mode: str | Mode,
    max_new_tokens: int,
    block_len: int | None = None,
    threshold: float | None = 0.9,
    steps: int | None = None,
    stop: Sequence[int] | None = None,
    eos_id: int | None = None,
    draft_adapter: str | None = "draft",
    draft_override: DraftOverride | None = None,
    policy: object | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | Sequence[int] | None = None,
    acceptance: str = "auto",
    tree_nodes: int | None = None,
    tree_branch: int = 3,
    tree_min_prob: float | None = None,
    drafter: str = "auto",
    lookup: bool = True,
    datastore: bool = True,
    max_thinking_tokens: int | Sequence[int | None] | None = None,
    think_ids: tuple[Sequence[int], Sequence[int]] | None = None,
    images: Sequence[object] | None = None,
    image_limits: object | None = None,
) -> tuple[Mode, DecodeConfig, list[Row]]:
    """Validate a request and build its config and row state (raises ValueError on bad input)."""
    m = Mode.parse(mode)
    if block_len is None:  # the measured best stored with the model (decoding.json), else the CLI's default
        from ..models import DEFAULT_BLOCK_LEN, best_block_len

        block_len = best_block_len(model, m.value, fallback=DEFAULT_BLOCK_LEN)
    if tree_nodes is None:  # linear: the verify tree stored with the model (decoding.json), else a chain
        from ..models import stored_tree_nodes

        tree_nodes = stored_tree_nodes(model, m.value, block_len)
    if tree_min_prob is None:  # the depth cut stored with the model at its block length, else none
        from ..models import stored_tree_min_prob

        tree_min_prob = stored_tree_min_prob(model, m.value, block_len)
    sampling = _sampling(len(prompts) if isinstance(prompts, Sequence) else 0, temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, acceptance=acceptance)
    cfg = DecodeConfig(
        max_new_tokens=max_new_tokens, block_len=block_len, threshold=threshold, steps=steps,
        draft_adapter=draft_adapter, draft_override=draft_override, policy=policy, tree_nodes=tree_nodes,
        tree_branch=tree_branch, tree_min_prob=tree_min_prob, drafter=drafter,
        lookup=lookup, datastore=datastore,
    )
    _check_prompts(prompts)
    bad = [t for t in stop or () if not isinstance(t, int) or isinstance(t, bool)]
    if bad:
        raise ValueError(f"stop token ids must be integers, got {bad[:5]}")
    eos = eos_id if eos_id is not None else model.config.eos_token_id
    stop_ids = set(stop or ()) | ({eos} if eos is not None else set())
    feats = None
    if images is not None or getattr(model, "vision", None) is not None:
        from ..images import DEFAULT_LIMITS, embed_prompts

        prompts, feats = embed_prompts(model, prompts, [None] * len(prompts) if images is None else images,
                                       limits=image_limits or DEFAULT_LIMITS)
    rows = make_rows(prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, sampling=sampling)
    for r, f in zip(rows, feats or ()):
        r.image_embeds = f
    _thinking(rows, max_thinking_tokens, think_ids, max_new_tokens)
    validate_rows(model, rows, needs_mask=REGISTRY[m].needs_mask)
    return m, cfg, rows


def _thinking(rows: list[Row], budget, think_ids, max_new_tokens: int) -> None:
    """Give each row its thinking budget (decode/thinking.py): one int for all, or one per prompt (None:
    no budget for that one). think_ids: (ids of <think>, ids of </think>), e.g. from
    `Tokenizer.think_ids()`."""
    if budget is None:
        return
    from .thinking import ThinkState

    per = list(budget) if isinstance(budget, Sequence) else [budget] * len(rows)
    if len(per) != len(rows):
        raise ValueError(f"max_thinking_tokens: one budget per prompt ({len(rows)}) or one for all, got {len(per)}")
    if think_ids is None or len(think_ids) != 2:
        raise ValueError("max_thinking_tokens needs think_ids=(ids of <think>, ids of </think>)")
    for r, b in zip(rows, per):
        if b is None:
            continue
        if isinstance(b, int) and not isinstance(b, bool) and b > max_new_tokens:
            raise ValueError(f"max_thinking_tokens {b} exceeds max_new_tokens {max_new_tokens}")
        r.think = ThinkState.for_prompt(r.prompt, b, think_ids[0], think_ids[1])


def _sampling(
    n: int, *, temperature: float, top_k: int, top_p: float, min_p: float, seed: int | Sequence[int] | None,
    acceptance: str,
) -> list[SamplingParams | None]:
    """One SamplingParams per prompt (None for all when temperature is 0: the greedy paths).

    seed: an int gives prompt i the seed `seed + i`; a list gives one per prompt; None draws
    nondeterministic seeds (reported in each Generation's stats["seed"]). Validated even when greedy.
    """
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        if len(seed) != n:
            raise ValueError(f"seed must be an int, None or a list of one seed per prompt ({n}), got {len(seed)}")
        seeds = list(seed)
    elif seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        seeds = [None if seed is None else seed + i for i in range(n)]
    else:
        raise ValueError(f"seed must be an int, None or a list of one seed per prompt, got {seed!r:.60}")
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=s,
                             acceptance=acceptance) for s in seeds]
    return [None if p.greedy else p for p in params]


def run(model: DecodableModel, mode: Mode, cfg: DecodeConfig, rows: Sequence[Row]) -> Iterator[Step]:
    """Drive a prepared request: one `Step` per forward (new_tokens indexed in prompt order, i.e. by
    row.index); tokens and counters accumulate in `rows`."""

    def in_prompt_order(step: Step) -> Step:
        out: list[list[int] | None] = [None] * len(rows)
        for r, toks in zip(step.rows, step.new_tokens):
            out[r.index] = toks
        return Step(step.kind, out, rows)

    dec = make_decoder(model, mode, cfg)
    with torch.inference_mode():
        for step in dec.admit(rows):
            yield in_prompt_order(step)
        while not dec.idle:
            for step in dec.cycle():
                yield in_prompt_order(step)


def generations(rows: Sequence[Row], mode: Mode) -> list[Generation]:
    out = []
    for r in rows:
        st = r.stats(mode.value)
        out.append(Generation(r.tokens, st["nfe"], r.finish_reason or "length", st))
    return out


def generate(
    model: DecodableModel,
    prompts: Sequence[Sequence[int]],
    *,
    mode: str | Mode,
    max_new_tokens: int,
    block_len: int | None = None,
    threshold: float | None = 0.9,
    stop: Sequence[int] | None = None,
    eos_id: int | None = None,
    **options: object,
) -> list[Generation]:
    """Decode every prompt (a list of token-id lists; ragged lengths are fine) in one batch.

    mode: "ar", "diffusion", "linear" or "quadratic". block_len: diffusion block / draft length
    (default: the model's measured best for the mode, `decoding.json` beside its weights, else 4, as
    in the CLI).
    threshold: diffusion confidence threshold (None: even schedule over `steps`). stop: extra stop
    token ids. eos_id: defaults to the model's. Sampling (docs/sampling.md): temperature (0, the
    default, is greedy), top_k, top_p, min_p, seed (int: prompt i gets seed + i; or one per prompt),
    acceptance ("auto", "match" or "rejection": the rule of the speculative modes; each Generation's
    stats["acceptance_rule"] says which ran). Other options: steps,
    draft_adapter (name of the LoRA used in draft passes, default "draft" when present), drafter
    (linear mode: "adapter", "feature" (the model's feature drafter, trimode/feature_drafter.py) or
    "auto": the one stored with the model's measured defaults, else the feature drafter when the model
    has one), lookup (feature drafter, greedy trees: also verify the prompt-lookup continuation; default
    True), datastore (the same with the continuation the feature drafter's datastore retrieves, when it
    has one, trimode/datastore.py; default True),
    draft_override (a hook replacing draft proposals), policy (diffusion unmasking policy object,
    e.g. `Oracle(reference)`; overrides threshold / steps). images (a vision-language model): one
    entry per prompt, None or a list of images (bytes, paths, data: URLs, PIL images), each placed at
    one image token of its prompt (docs/vision.md); image_limits: a `trimode.images.ImageLimits`.
    Each Generation holds the new tokens (EOS
    and stop tokens excluded), the forwards that row took part in (prefill included) and stats.
    """
    m, cfg, rows = prepare(model, prompts, mode=mode, max_new_tokens=max_new_tokens, block_len=block_len,
                           threshold=threshold, stop=stop, eos_id=eos_id, **options)
    for _ in run(model, m, cfg, rows):
        pass
    return generations(rows, m)


__all__ = [
    "EMIT",
    "FORWARD_KINDS",
    "PREFILL",
    "DecodableModel",
    "DecodeConfig",
    "Decoder",
    "EvenSchedule",
    "JointThreshold",
    "Generation",
    "MODE_NAMES",
    "Mode",
    "SPECULATIVE_MODES",
    "Oracle",
    "PolicyContext",
    "Row",
    "Step",
    "Threshold",
    "generate",
    "generations",
    "make_rows",
    "make_decoder",
    "prepare",
    "resolve_drafter",
    "run",
    "validate_rows",
]
