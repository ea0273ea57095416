"""Run one decoding configuration over a prompt suite and record what every forward did.

The decoders' own counters (`Generation.stats`) and an independent count are both kept: the model
is wrapped in a `TimedModel`, so every forward actually run is timed and counted by the wrapper; the
decoder's Steps (one per forward, in order) label each call with its kind. Three checks hold for
every batch (a mismatch raises `RuntimeError`):

- the wrapper counted exactly one forward per non-EMIT Step;
- at batch 1, the row's `nfe` (decoder bookkeeping) equals the forwards the wrapper counted (in a
  batch, each row's `nfe` is at most that);
- each row's token count equals the sum of its per-step commits (`step_tokens`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..decode import EMIT, generations, prepare, run
from .suites import Prompt
from .timing import Call, TimedModel, synchronize


@dataclass(frozen=True)
class Config:
    """One decoding configuration. policy: "threshold" (or the even schedule when threshold is
    None) or "oracle" (diffusion speed-of-light: the AR greedy continuation as reference)."""

    mode: str
    block_len: int = 1
    threshold: float | None = None
    policy: str = "threshold"
    tree_nodes: int = 0  # linear: a verify tree of this many draft nodes (0: a chain)
    drafter: str = "auto"  # linear: "adapter" (a draft pass of the model) or "feature" (its feature drafter)
    tree_min_prob: float = 0.0  # linear feature-drafter trees: stop drafting deeper below this path probability
    datastore: bool = True  # linear feature-drafter trees: verify the drafter's datastore path too (when it has one)

    @property
    def label(self) -> str:
        if self.mode == "ar":
            return "ar"
        if self.mode == "diffusion":
            if self.policy == "oracle":
                return f"sol k={self.block_len}"
            return f"diffusion k={self.block_len} t={self.threshold}"
        return (f"{self.mode} k={self.block_len}" + (f" tree{self.tree_nodes}" if self.tree_nodes else "")
                + (" feature" if self.mode == "linear" and self.drafter == "feature" else "")
                + (f" p{self.tree_min_prob:g}" if self.tree_nodes and self.tree_min_prob else "")
                + (" no-ds" if not self.datastore else ""))

    @property
    def speculative(self) -> bool:
        return self.mode in ("linear", "quadratic")


@dataclass
class RowResult:
    prompt: Prompt
    tokens: list[int]
    stats: dict
    finish_reason: str
    nfe_steps: int  # Steps that name this row (new_tokens not None)


@dataclass
class RunResult:
    """All batches of one configuration: rows in suite order, the wrapper's calls, wall time."""

    config: Config
    rows: list[RowResult] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    seconds: float = 0.0
    by_category_seconds: dict[str, float] = field(default_factory=dict)
    by_category_calls: dict[str, list[Call]] = field(default_factory=dict)
    # One (category, rows, calls, seconds) per batch, in order: lets repeats be merged batch by batch.
    batches: list[tuple[str, list[RowResult], list[Call], float]] = field(default_factory=list)

    def add(self, cat: str, rows: list[RowResult], calls: list[Call], seconds: float) -> None:
        self.rows.extend(rows)
        self.calls.extend(calls)
        self.seconds += seconds
        self.by_category_seconds[cat] = self.by_category_seconds.get(cat, 0.0) + seconds
        self.by_category_calls.setdefault(cat, []).extend(calls)
        self.batches.append((cat, rows, calls, seconds))


def fastest(results: Sequence[RunResult]) -> RunResult:
    """Merge repeats of one configuration batch by batch, keeping each batch's fastest run (the
    counters and outputs of every repeat are identical; checked). On a shared machine the load
    drifts over seconds: the minimum per batch is the least disturbed measurement of each."""
    first = results[0]
    out = RunResult(first.config)
    for i, (cat, rows, _, _) in enumerate(first.batches):
        for r in results[1:]:
            if [x.tokens for x in r.batches[i][1]] != [x.tokens for x in rows]:
                raise RuntimeError(f"{first.config.label}: outputs differ between repeats")
        best = min((r.batches[i] for r in results), key=lambda b: b[3])
        out.add(cat, *best[1:])
    return out


def oracle_policy(reference: Sequence[Sequence[int]]):
    """`trimode.decode.policies.Oracle(reference)`: reference[i] is prompt i's AR greedy output."""
    from ..decode.policies import Oracle

    return Oracle([list(r) for r in reference])


def decode_batch(
    timed: TimedModel,
    prompts: Sequence[Prompt],
    config: Config,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    reference: Sequence[Sequence[int]] | None = None,
) -> tuple[list[RowResult], list[Call], float]:
    """Decode one batch; returns its rows, the wrapper's calls (kinds filled in) and wall seconds."""
    opts: dict = {}
    if config.policy == "oracle":
        if config.mode != "diffusion" or reference is None:
            raise ValueError("the oracle policy is for diffusion mode and needs the AR reference")
        opts["policy"] = oracle_policy(reference)
    mode, cfg, rows = prepare(
        timed, [list(p.tokens) for p in prompts], mode=config.mode, max_new_tokens=max_new_tokens,
        block_len=config.block_len, threshold=config.threshold, eos_id=eos_id, tree_nodes=config.tree_nodes,
        tree_min_prob=config.tree_min_prob, datastore=config.datastore,
        drafter=config.drafter if config.mode == "linear" else "auto", **opts,
    )
    start = len(timed.calls)
    forwards = 0
    took_part = [0] * len(prompts)
    synchronize(timed.model.device)
    t0 = time.perf_counter()
    for step in run(timed, mode, cfg, rows):
        if step.kind == EMIT:
            continue
        forwards += 1
        # A cycle may run several forwards (linear: draft + verify) before yielding their Steps, in
        # order: the i-th forward Step describes the i-th call the wrapper saw.
        if len(timed.calls) - start < forwards:
            raise RuntimeError(
                f"{config.label}: the decoder yielded {forwards} forward Steps but the wrapper counted only "
                f"{len(timed.calls) - start} forwards"
            )
        timed.calls[start + forwards - 1].kind = step.kind
        for b, toks in enumerate(step.new_tokens):
            if toks is not None:
                took_part[b] += 1
    synchronize(timed.model.device)
    seconds = time.perf_counter() - t0
    calls = timed.calls[start:]
    if len(calls) != forwards:
        raise RuntimeError(f"{config.label}: {len(calls)} forwards run, {forwards} forward Steps yielded")
    out = []
    for b, g in enumerate(generations(rows, mode)):
        # At batch 1 every forward the wrapper saw is one of this row's forwards. In a batch a forward
        # serves several rows and a row sits out some (finished, or done denoising): its nfe is at most
        # the forwards run.
        if (len(prompts) == 1 and g.nfe != forwards) or g.nfe > forwards:
            raise RuntimeError(f"{config.label}: row {b} reports nfe={g.nfe}; the wrapper counted {forwards} forwards")
        if sum(g.stats["step_tokens"]) != len(g.tokens):
            raise RuntimeError(f"{config.label}: row {b} step_tokens sum != {len(g.tokens)} tokens")
        out.append(RowResult(prompts[b], list(g.tokens), g.stats, g.finish_reason, took_part[b]))
    return out, calls, seconds


def batches(prompts: Sequence[Prompt], size: int) -> list[list[Prompt]]:
    return [list(prompts[i:i + size]) for i in range(0, len(prompts), size)]


def run_config(
    model: torch.nn.Module,
    suites: dict[str, list[Prompt]],
    config: Config,
    *,
    max_new_tokens: int,
    batch_size: int = 1,
    eos_id: int | None = None,
    reference: dict[str, list[int]] | None = None,
) -> RunResult:
    """Decode every prompt of every category (batches never mix categories).

    reference: AR greedy outputs by prompt source (needed by the oracle policy).
    """
    timed = TimedModel(model)
    res = RunResult(config)
    for cat, prompts in suites.items():
        for batch in batches(prompts, batch_size):
            ref = [reference[p.source] for p in batch] if reference is not None else None
            rows, calls, s = decode_batch(timed, batch, config, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                          reference=ref)
            res.add(cat, rows, calls, s)
    return res


def warm_up(model: torch.nn.Module, prompt: Prompt, configs: Sequence[Config], *, eos_id: int | None) -> None:
    """One short decode per mode, so no configuration pays first-call costs in its timing."""
    timed = TimedModel(model)
    for c in configs:
        if c.policy == "oracle":
            continue
        decode_batch(timed, [prompt], c, max_new_tokens=max(2, min(8, c.block_len + 1)), eos_id=eos_id)
