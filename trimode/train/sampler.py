"""`trimode train-sampler`: the learned unmasking sampler for diffusion mode (docs/design-notes.md §9).

1. Trajectories: diffusion decoding of training prompts with the real decoder, under a recording
   policy. At every denoising forward it stores, for every slot of the block, the features of
   `trimode.decode.learned.slot_features` and the label "top-1 == the AR-consistent token" (the
   token of the prompt's AR greedy continuation at that position). It fills slots like a threshold
   policy whose threshold is drawn per row (so states with many and few filled slots both occur),
   and writes the AR token into every slot it fills (teacher forcing), so the canvas stays
   AR-consistent and the labels stay meaningful for the whole trajectory.
   On-policy rounds (DAgger, `--rounds`): the scorers trained so far decode the training prompts
   themselves, unforced, mixed with confidence-threshold rows (per-row threshold and rule drawn at
   random), so the data holds the states their own wrong fills lead to. There a slot's label is
   "top-1 == the AR greedy continuation of what the row has actually committed before this block"
   (one AR rollout per row and block). Each round adds its records to the pool and refits.
2. Two scorers trained with binary cross-entropy on the still-masked slots: a per-slot MLP and a
   small bidirectional transformer over the block.
3. Saved beside the checkpoint: DIR/sampler/{mlp,transformer}/ (or --out); `trimode generate
   --mode diffusion --policy learned` and `trimode.decode.learned.LearnedPolicy` use them. A model
   inside the installed package (`--model bundled`) is never written to by default: the samplers go
   to `$TRIMODE_CACHE/trained/bundled/sampler` (pass it as `generate --sampler`); only an explicit
   `--out` writes into the package. The output directory is checked for writability up front.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._io import check_writable_dir, load_state, os_error_message
from ..decode.learned import FEATURES, KINDS, Sampler, build_scorer, slot_features
from ..decode.policies import PolicyContext


@dataclass
class Trajectories:
    """One record per (row, denoising forward): feats (N, n, F), cand (N, n), label (N, n) bools."""

    feats: torch.Tensor
    cand: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return self.feats.shape[0]

    def split(self, frac: float, seed: int) -> tuple[Trajectories, Trajectories]:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        k = int(len(self) * frac)
        a, b = perm[k:], perm[:k]
        return (Trajectories(self.feats[a], self.cand[a], self.label[a]),
                Trajectories(self.feats[b], self.cand[b], self.label[b]))


def full_reference(gens, eos_id: int | None) -> list[list[int]]:
    """AR greedy tokens per prompt, plus the EOS that ended it (the canvas holds it too)."""
    return [g.tokens + ([eos_id] if g.finish_reason == "stop" and eos_id is not None else []) for g in gens]


class _Recorder:
    """The record store shared by the recording policies: one record per row and forward that had
    something to fill."""

    def __init__(self) -> None:
        self.feats: list[torch.Tensor] = []
        self.cand: list[torch.Tensor] = []
        self.label: list[torch.Tensor] = []

    def record(self, feats: torch.Tensor, candidates: torch.Tensor, label: torch.Tensor) -> None:
        keep = candidates.any(1)
        self.feats.append(feats[keep].cpu())
        self.cand.append(candidates[keep].cpu())
        self.label.append(label[keep].cpu())

    def trajectories(self) -> Trajectories:
        return Trajectories(torch.cat(self.feats), torch.cat(self.cand), torch.cat(self.label))


class RecordingPolicy(_Recorder):
    """Records features and labels, fills like Threshold(tau[row]) and forces the AR tokens."""

    def __init__(self, reference: list[list[int]], taus: list[float]) -> None:
        super().__init__()
        self.reference = reference
        self.taus = taus

    def labels(self, ctx: PolicyContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) reference token per slot (-1 past its end) and whether the top-1 equals it."""
        B, n = ctx.proposal.shape
        ref = torch.full((B, n), -1, dtype=torch.long)
        for b, row in enumerate(ctx.rows):
            r = self.reference[row.index]
            base = ctx.start[b] + 1
            seg = r[base: base + n]
            if seg:
                ref[b, : len(seg)] = torch.tensor(seg)
        ref = ref.to(ctx.proposal.device)
        return ref, (ctx.proposal == ref) & (ref >= 0)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext) -> torch.Tensor:
        feats = slot_features(conf, candidates, step, ctx)
        ref, lab = self.labels(ctx)
        self.record(feats, candidates, lab)
        tau = torch.tensor([self.taus[row.index] for row in ctx.rows], device=conf.device)[:, None]
        scored = conf.masked_fill(~candidates, -1.0)
        best = torch.zeros_like(candidates)
        best.scatter_(1, scored.argmax(1, keepdim=True), True)
        fill = candidates & ((conf >= tau) | best)
        forced = fill & (ref >= 0)
        ctx.proposal[forced] = ref[forced]
        return fill


def _select_per_row(conf: torch.Tensor, learned: dict[str, torch.Tensor], candidates: torch.Tensor,
                    behaviours: list[tuple[str, str, float]]) -> torch.Tensor:
    """Each row fills by its own (score, rule, tau): score is "confidence" or a sampler kind."""
    from ..decode.policies import RULES

    dev = conf.device
    tau = torch.tensor([b[2] for b in behaviours], device=dev, dtype=torch.float32)[:, None]
    fill = torch.zeros_like(candidates)
    scores = {"confidence": conf, **learned}
    for name, score in scores.items():
        for rule, fn in RULES.items():
            pick = torch.tensor([b[0] == name and b[1] == rule for b in behaviours], device=dev)
            if bool(pick.any()):
                fill |= pick[:, None] & fn(score, candidates, tau)
    return fill


class OnPolicyRecorder(_Recorder):
    """Records features and labels while every row fills by its own behaviour policy, unforced.

    behaviours[row.index] = (score, rule, tau): score "confidence" or a key of `samplers`, rule
    "each" or "joint" (`trimode.decode.policies.RULES`). Labels compare each slot's top-1 with the
    AR greedy continuation of the row's committed tokens (one rollout per row and block, cached)."""

    def __init__(self, model, eos_id: int | None, behaviours: list[tuple[str, str, float]],
                 samplers: dict[str, Sampler]) -> None:
        super().__init__()
        self.model = model
        self.eos_id = eos_id
        self.behaviours = behaviours
        self.samplers = samplers
        self.refs: dict[tuple[int, int], list[int]] = {}

    def labels(self, ctx: PolicyContext) -> torch.Tensor:
        from ..decode import generate

        B, n = ctx.proposal.shape
        need = [b for b, row in enumerate(ctx.rows) if (row.index, ctx.start[b]) not in self.refs]
        if need:
            # The seed (canvas slot 0) is the AR prediction after the committed tokens, so the
            # rollout's first token is the seed and masked slot i is its token i + 1.
            ctxs = [list(ctx.rows[b].prompt) + list(ctx.rows[b].tokens) for b in need]
            gens = generate(self.model, ctxs, mode="ar", max_new_tokens=n + 1, eos_id=self.eos_id)
            for b, g in zip(need, full_reference(gens, self.eos_id)):
                self.refs[(ctx.rows[b].index, ctx.start[b])] = g[1:n + 1]
        ref = torch.full((B, n), -1, dtype=torch.long)
        for b, row in enumerate(ctx.rows):
            seg = self.refs[(row.index, ctx.start[b])]
            if seg:
                ref[b, : len(seg)] = torch.tensor(seg)
        ref = ref.to(ctx.proposal.device)
        return (ctx.proposal == ref) & (ref >= 0)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext) -> torch.Tensor:
        feats = slot_features(conf, candidates, step, ctx)
        self.record(feats, candidates, self.labels(ctx))
        learned = {k: s.scores(feats) for k, s in self.samplers.items()}
        return _select_per_row(conf, learned, candidates, [self.behaviours[r.index] for r in ctx.rows])


def concat(parts: list[Trajectories]) -> Trajectories:
    """Stack trajectory sets whose blocks may differ in length (shorter ones padded, not candidates)."""
    n = max(p.feats.shape[1] for p in parts)

    def pad(t: torch.Tensor, fill) -> torch.Tensor:
        if t.shape[1] == n:
            return t
        shape = (t.shape[0], n - t.shape[1], *t.shape[2:])
        return torch.cat([t, torch.full(shape, fill, dtype=t.dtype)], 1)

    return Trajectories(torch.cat([pad(p.feats, 0.0) for p in parts]), torch.cat([pad(p.cand, False) for p in parts]),
                        torch.cat([pad(p.label, False) for p in parts]))


def collect(model, prompts: list[list[int]], *, block_len: int, new: int, eos_id: int | None, batch: int = 32,
            tau_range: tuple[float, float] = (0.3, 1.0), seed: int = 0, log=print,
            samplers: dict[str, Sampler] | None = None, rules: tuple[str, ...] = ("each", "joint")) -> Trajectories:
    """Denoising trajectories of diffusion mode on `prompts` (see the module docstring).

    samplers=None: teacher-forced, threshold-like filling (round 0). Otherwise on-policy: each row
    decodes unforced by one of the samplers or by the confidence, with a rule from `rules` and a
    threshold from `tau_range`, all drawn per row (an on-policy round)."""
    from ..decode import generate

    rng = random.Random(seed)
    parts = []
    t0 = time.perf_counter()
    scores = ["confidence", *(samplers or {})]
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        if samplers is None:
            ar = generate(model, chunk, mode="ar", max_new_tokens=new, eos_id=eos_id)
            ref = full_reference(ar, eos_id)
            taus = [rng.uniform(*tau_range) for _ in chunk]
            rec = RecordingPolicy(ref, taus)
            gens = generate(model, chunk, mode="diffusion", max_new_tokens=new, block_len=block_len, eos_id=eos_id,
                            policy=rec)
            assert [g.tokens for g in gens] == [g.tokens for g in ar], "teacher forcing must reproduce AR"
        else:
            beh = [(rng.choice(scores), rng.choice(rules), rng.uniform(*tau_range)) for _ in chunk]
            rec = OnPolicyRecorder(model, eos_id, beh, samplers)
            generate(model, chunk, mode="diffusion", max_new_tokens=new, block_len=block_len, eos_id=eos_id,
                     policy=rec)
        parts.append(rec.trajectories())
        log(f"  trajectories {min(s + batch, len(prompts))}/{len(prompts)} prompts, "
            f"{sum(len(p) for p in parts)} records ({time.perf_counter() - t0:.0f}s)")
    return concat(parts)


def train_samplers(model, prompts: list[list[int]], kinds: list[str], *, block_len: int, new: int,
                   eos_id: int | None, rounds: int = 2, steps: int = 400, batch: int = 32, fit_batch: int = 256,
                   seed: int = 0, data: Trajectories | None = None, log=print,
                   holdout: float = 0.0) -> tuple[dict[str, Sampler], Trajectories, Trajectories | None]:
    """Round 0: teacher-forced trajectories (or `data`), fit every kind; rounds 1..R: on-policy
    trajectories under the current scorers (DAgger), pooled with all earlier ones, refit.
    Returns the samplers, the pooled training records and (holdout > 0) the held-out records of
    the last round's on-policy data (the states the final policies' predecessors reach)."""
    if data is None:
        data = collect(model, prompts, block_len=block_len, new=new, eos_id=eos_id, batch=batch, seed=seed, log=log)
    pool, val = data, None
    if holdout > 0:
        pool, val = data.split(holdout, seed)

    def fit_all() -> dict[str, Sampler]:
        return {k: fit(pool, k, steps=steps, batch=fit_batch, seed=seed, log=log) for k in kinds}

    samplers = fit_all()
    for r in range(1, rounds + 1):
        log(f"on-policy round {r}/{rounds}: decoding with {', '.join(kinds)} and the confidence, unforced")
        more = collect(model, prompts, block_len=block_len, new=new, eos_id=eos_id, batch=batch, seed=seed + 7919 * r,
                       log=log, samplers=samplers, tau_range=(0.2, 0.97))
        if holdout > 0:
            more, val = more.split(holdout, seed + r)
        pool = concat([pool, more])
        log(f"  pooled {len(pool)} records; top-1 right on {float(more.label[more.cand].float().mean()):.3f} "
            f"of this round's masked slots")
        samplers = fit_all()
    return samplers, pool, val


def fit(data: Trajectories, kind: str, *, steps: int = 400, batch: int = 256, lr: float = 3e-3, seed: int = 0,
        sizes: dict[str, int] | None = None, log=print) -> Sampler:
    """Train a scorer with BCE on candidate slots; returns it with its normalisation."""
    torch_gen = torch.Generator().manual_seed(seed)
    sel = data.cand
    flat = data.feats[sel]
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-4)
    sizes = dict(sizes or ({"hidden": 64} if kind == "mlp" else {"d_model": 64, "layers": 2, "heads": 4}))
    with torch.random.fork_rng(devices=[]):  # module init uses the global RNG: seed it privately
        torch.manual_seed(seed)
        model = build_scorer(kind, sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    pos = float(data.label[sel].float().mean())
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(len(data), (batch,), generator=torch_gen)
        x = (data.feats[idx] - mean) / std
        c, y = data.cand[idx], data.label[idx].float()
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits[c], y[c])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())
        if step % 100 == 0 or step == steps:
            log(f"  {kind} step {step}  bce {float(loss.detach()):.4f}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    meta = {"sizes": sizes, "train_records": len(data), "train_slots": int(sel.sum()), "positive_rate": pos}
    return Sampler(kind, model, mean, std, meta)


@torch.no_grad()
def evaluate_scores(sampler: Sampler | None, data: Trajectories, *, seed: int = 0) -> dict[str, float]:
    """Held-out metrics on candidate slots: BCE, AUC, and the precision of the slot each forward
    would fill first (the argmax score) against a random candidate and the max-confidence one."""
    conf = data.feats[..., FEATURES.index("p1")]
    if sampler is None:
        s = conf
    else:
        s = sampler.scores(data.feats)
    c, y = data.cand, data.label
    sc = s.masked_fill(~c, -1.0)
    top = sc.argmax(1)
    prec_top = float(y.gather(1, top[:, None]).float().mean())
    g = torch.Generator().manual_seed(seed)
    rnd = (torch.rand(c.shape, generator=g) * c).argmax(1)
    prec_rand = float(y.gather(1, rnd[:, None]).float().mean())
    out = {"precision_first": prec_top, "precision_random": prec_rand, "auc": auc(s[c], y[c])}
    if sampler is not None:
        out["bce"] = float(F.binary_cross_entropy(s[c].clamp(1e-6, 1 - 1e-6), y[c].float()))
    return out


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (rank statistic; ties get half credit)."""
    label = label.bool()
    npos, nneg = int(label.sum()), int((~label).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = score.float().argsort()
    ranks = torch.empty_like(score, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    # average ranks over ties
    s_sorted = score.float()[order]
    uniq, inv, counts = torch.unique_consecutive(s_sorted, return_inverse=True, return_counts=True)
    cum = counts.cumsum(0).double()
    avg = cum - (counts.double() - 1) / 2
    ranks[order] = avg[inv]
    return float((ranks[label].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trimode train-sampler", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint dir, a training run dir, or 'bundled'")
    p.add_argument("--out", default=None, help="output dir (default MODEL/sampler; for --model bundled "
                                               "$TRIMODE_CACHE/trained/bundled/sampler, never inside the "
                                               "package); gets mlp/ and transformer/")
    p.add_argument("--prompts", nargs="*", default=[], help="prompt data (as train-drafter)")
    p.add_argument("--n-prompts", type=int, default=96)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--block-len", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=600, help="training steps per scorer")
    p.add_argument("--kinds", default="mlp,transformer")
    p.add_argument("--rounds", type=int, default=2,
                   help="on-policy (DAgger) rounds after the teacher-forced one (0: teacher-forced only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-cache", default=None, help="save / reuse the trajectories (.pt)")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint import load_model
    from ..tokenizer import load_tokenizer
    from .distill import train_prompts
    from .drafter import package_model_output, resolve_model_dir

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def log(s: str) -> None:
        print(s, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        if args.rounds < 0:
            raise ValueError(f"--rounds must be >= 0, got {args.rounds}")
        kinds = [k for k in args.kinds.split(",") if k]
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown sampler kind {k!r}; choose from {', '.join(KINDS)}")
        mdir = resolve_model_dir(args.model)
        user = package_model_output(mdir, "sampler")
        out = Path(args.out) if args.out else (user or mdir / "sampler")
        check_writable_dir(out, "sampler output directory")  # before any trajectory is collected
        if args.data_cache and not Path(args.data_cache).exists():
            check_writable_dir(Path(args.data_cache).parent, "--data-cache directory")
        if not args.out and user is not None:
            log(f"note: {mdir} is inside the installed package, which a default run never changes: the samplers go "
                f"to {out} (use them with `trimode generate --policy learned --sampler {out}`; choose with --out)")
        model = load_model(mdir, dtype=torch.float32)
        tok = load_tokenizer(mdir)
        if tok is None:
            raise ValueError(f"{mdir} has no tokenizer")
        if model.config.mask_token_id is None:
            raise ValueError("the model has no mask token: diffusion mode needs one")
        t0 = time.perf_counter()
        if args.data_cache and Path(args.data_cache).exists():
            data = Trajectories(**load_state(Path(args.data_cache), "the trajectory cache"))
            log(f"{len(data)} trajectory records from {args.data_cache}")
        else:
            prompts = train_prompts(mdir, tok, args.prompts, n=args.n_prompts, prompt_len=args.prompt_len,
                                    seed=args.seed + 1)
            log(f"collecting diffusion trajectories on {len(prompts)} training prompts "
                f"(block {args.block_len}, {args.new_tokens} new tokens)")
            data = collect(model, prompts, block_len=args.block_len, new=args.new_tokens,
                           eos_id=model.config.eos_token_id, batch=args.batch, seed=args.seed, log=log)
            if args.data_cache:
                Path(args.data_cache).parent.mkdir(parents=True, exist_ok=True)
                torch.save(vars(data), args.data_cache)
        prompts = train_prompts(mdir, tok, args.prompts, n=args.n_prompts, prompt_len=args.prompt_len,
                                seed=args.seed + 1) if args.rounds else []
        samplers, pool, val = train_samplers(model, prompts, kinds, block_len=args.block_len, new=args.new_tokens,
                                             eos_id=model.config.eos_token_id, rounds=args.rounds,
                                             steps=args.steps, batch=args.batch, seed=args.seed, data=data, log=log,
                                             holdout=0.15)
        res: dict[str, Any] = {"model": str(mdir), "out": str(out), "records": len(pool) + len(val),
                               "rounds": args.rounds, "positive_rate": float(pool.label[pool.cand].float().mean()),
                               "val_confidence": evaluate_scores(None, val)}
        log(f"{len(pool)} train / {len(val)} validation records (validation: the last round's held-out 15%); "
            f"confidence alone: {res['val_confidence']}")
        for kind, smp in samplers.items():
            smp.meta["val"] = evaluate_scores(smp, val)
            smp.meta["block_len"] = args.block_len
            smp.meta["model"] = str(mdir)
            smp.meta["rounds"] = args.rounds
            smp.save(out / kind)
            res[kind] = smp.meta["val"]
            size = sum(f.stat().st_size for f in (out / kind).iterdir())
            log(f"{kind}: validation {smp.meta['val']}  saved {out / kind} ({size / 1e3:.1f} kB)")
        res["seconds"] = time.perf_counter() - t0
    except ValueError as e:
        print(f"trimode train-sampler: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed during the run (a full disk, a directory made read-only)
        print(f"trimode train-sampler: error: {os_error_message(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
