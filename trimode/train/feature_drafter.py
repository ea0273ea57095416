"""`trimode train-feature-drafter`: train the feature-level drafter (trimode/feature_drafter.py) on the
verifier's own hidden states.

Data: a self-distillation cache of `trimode train-drafter --data-cache` (prompts + the model's own
greedy continuations). The frozen verifier runs once over every sequence and its final-normed hidden
states f_t are kept (cached to --features-cache). For every pair j the drafter sees (f_j + noise,
embed(x_{j+1})) causally and is trained, as in EAGLE (arXiv 2401.15077), to predict f_{j+1}
(smooth-L1, weight --reg-weight) and the verifier's next-token distribution softmax(head(f_{j+1}))
over the drafter's vocabulary (cross-entropy against those soft targets, weight --ce-weight). The
uniform feature noise (--noise, relative to the features' RMS) stands in for the drafter's own
errors when it drafts several steps from its predicted features. A held-out share of the sequences
(--heldout) reports top-1 agreement with the verifier after every --eval-every steps.

Resumable: --out holds trainer_state.pt (weights, optimiser, step, RNG); the finished drafter is
written to --out (feature_drafter.json / .safetensors) and loads with `--feature-drafter DIR`.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .._io import check_writable_dir, load_state

STATE = "trainer_state.pt"


def compute_features(model, tokens: torch.Tensor, lengths: torch.Tensor, *, batch: int, log=print,
                     taps: tuple[int, ...] = (), final: bool = True
                     ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
    """The verifier's final-normed hidden states (N, L, hidden) of right-padded sequences, bf16; with
    `taps`, also the outputs of those layers (N, L, len(taps), hidden) as a second item (and the
    first None when final=False: only the taps are wanted)."""
    N, L = tokens.shape
    h_size = model.config.hidden_size
    out = torch.zeros(N, L, h_size, dtype=torch.bfloat16) if final else None
    tapped = torch.zeros(N, L, len(taps), h_size, dtype=torch.bfloat16) if taps else None
    t0 = time.perf_counter()
    order = torch.argsort(lengths.long(), stable=True)  # similar lengths batched together: less padding
    with torch.no_grad():
        for i in range(0, N, batch):
            rows = order[i: i + batch]
            T = int(lengths[rows].max())
            r = model.features(tokens[rows, :T].to(model.device), taps=taps)
            if out is not None:
                out[rows, :T] = r[0].to(torch.bfloat16).cpu()
            if tapped is not None:
                tapped[rows, :T] = torch.stack(r[2], dim=2).to(torch.bfloat16).cpu()
            if (i // batch) % 10 == 0:
                log(f"  features {min(i + batch, N)}/{N} ({time.perf_counter() - t0:.0f}s)")
    return out if not taps else (out, tapped)


def drafter_vocab(model_dir: Path, tok, seqs: dict, size: int, vocab_size: int, *, eos_id, mask_id,
                  corpus: bool = True, log=print) -> torch.Tensor:
    """The drafter's vocabulary: the `size` ids ranked by the equal-weight mixture of the training
    targets' frequencies, the training splits and the Python stdlib (as scripts/make_draft_vocab.py);
    corpus=False ranks by the targets alone."""
    from .. import draftvocab

    seen = seqs["tokens"][seqs["valid"].bool()].reshape(-1)
    counts = draftvocab.corpus_counts(tok, vocab_size, log=log).values() if corpus and tok is not None else ()
    score = draftvocab.mixture(torch.bincount(seen, minlength=vocab_size), *counts)
    keep = [eos_id] if eos_id is not None else []
    drop = [mask_id] if mask_id is not None else []
    return draftvocab.from_counts(score, size, keep=keep, drop=drop)


class Ragged:
    """Per-sequence rows (sum of lengths, ...) without padding; `[idx]` gives the sequences idx padded
    with zeros to their longest (len(idx), max length, ...)."""

    def __init__(self, flat: torch.Tensor, lengths: torch.Tensor) -> None:
        if flat.shape[0] != int(lengths.sum()):
            raise ValueError(f"{flat.shape[0]} rows for sequences of {int(lengths.sum())} positions in all")
        self.flat, self.lengths = flat, lengths.long()
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        L = int(self.lengths[idx].max())
        out = self.flat.new_zeros((len(idx), L) + tuple(self.flat.shape[1:]))
        for k, i in enumerate(idx.tolist()):
            a, n = int(self.starts[i]), int(self.lengths[i])
            out[k, :n] = self.flat[a: a + n]
        return out


class _Unrolled:
    """A cache-like key/value store for unrolled training steps: step s's queries see the keys of steps
    0 .. s (concatenated, nothing written in place, so gradients flow through every step)."""

    def __init__(self) -> None:
        self.k: dict[int, list[torch.Tensor]] = {}  # per drafter layer, one entry per step so far
        self.v: dict[int, list[torch.Tensor]] = {}
        self.T = 0

    def begin(self, T: int) -> int:
        self.T = T
        return T * (len(self.k.get(0, [])) + 1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.setdefault(layer, []).append(k)
        self.v.setdefault(layer, []).append(v)
        return torch.cat(self.k[layer], dim=2), torch.cat(self.v[layer], dim=2)


def unroll_mask(T: int, step: int) -> torch.Tensor:
    """(T, (step + 1) T): the query of unrolled step `step` at pair j sees the true entries of pairs
    <= j - step (step 0's keys) and, for each later step b, its own chain's entry at pair j - step + b:
    exactly what drafting step + 1 tokens after the true pair j - step sees at inference."""
    j = torch.arange(T)[:, None]
    i = torch.arange(T)[None, :]
    parts = [i <= j - step] + [i == j - step + b for b in range(1, step + 1)]
    return torch.cat(parts, dim=1)


def pair_loss(fd, base, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *, noise: float,
              reg_weight: float, ce_weight: float, gen: torch.Generator | None = None, unroll: int = 1,
              tapped: torch.Tensor | None = None, target_temp: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Loss of one batch of sequences (feats (B, L, h) bf16, tokens (B, L), lengths (B,)).

    unroll > 1 trains the drafter on its own predictions too (as EAGLE-3's training-time test): step
    s feeds the feature step s - 1 predicted for each pair back in, attending to the true entries up
    to s pairs back and to its own chain (`unroll_mask`); every step is scored against the same
    targets, steps weighted equally. A multi-layer drafter (fd.taps) gets the base's tapped layer
    outputs `tapped` (B, L, n, h) as well and reads the fused feature of each true pair (noise is
    added after fusing); its targets stay the final features. target_temp < 1 sharpens the soft
    targets, softmax(logits / target_temp), toward the verifier's top choices (greedy acceptance
    depends on its ranking, not on the tail); `top1` is always against the verifier's argmax."""
    B, L = tokens.shape
    T = int(lengths.max()) - 1  # pairs j = 0 .. len - 2 (the target feature f_{j+1} must exist)
    f_in, f_out = feats[:, :T].float(), feats[:, 1: T + 1].float()
    if fd.taps:
        if tapped is None or tapped.shape[2] != len(fd.taps):
            raise ValueError(f"the drafter taps base layers {list(fd.taps)}: their outputs are needed")
        f_in = fd.fuse_features(f_in, list(tapped[:, :T].float().unbind(2))).float()
    if noise > 0:
        rms = f_in.detach().pow(2).mean().sqrt()
        u = torch.rand(f_in.shape, generator=gen) * 2 - 1
        f_in = f_in + u * noise * rms
    emb = base.embed_tokens(tokens[:, 1: T + 1]).detach()
    pos = torch.arange(1, T + 1)[None, :].expand(B, T)
    rows = fd.head_rows(base).float()
    with torch.no_grad():
        target = F.softmax(F.linear(f_out, rows) / target_temp, dim=-1)
    store = _Unrolled() if unroll > 1 else None
    total, out = 0.0, {}
    cur, pred = f_in, f_in
    for step in range(unroll):
        if step:
            cur = torch.cat([f_in[:, :1], pred[:, :-1].to(f_in.dtype)], dim=1)  # pair j gets step-1's f^_j
        mask = unroll_mask(T, step)[None].expand(B, -1, -1) if store is not None else None
        pred = fd(cur, emb, pos, mask=mask, cache=store).float()  # (B, T, h)
        valid = ((torch.arange(T)[None, :] < (lengths[:, None] - 1)) & (torch.arange(T)[None, :] >= step)).float()
        logp = F.log_softmax(F.linear(pred, rows), dim=-1)
        ce = -(target * logp).sum(-1)
        reg = F.smooth_l1_loss(pred, f_out, reduction="none").mean(-1)
        n = valid.sum().clamp(min=1)
        ce_m, reg_m = (ce * valid).sum() / n, (reg * valid).sum() / n
        total = total + (ce_weight * ce_m + reg_weight * reg_m) / unroll
        with torch.no_grad():
            top1 = ((logp.argmax(-1) == target.argmax(-1)).float() * valid).sum() / n
        sfx = "" if step == 0 else f"_{step + 1}"
        out.update({f"ce{sfx}": float(ce_m.detach()), f"reg{sfx}": float(reg_m.detach()), f"top1{sfx}": float(top1)})
    return total, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trimode train-feature-drafter", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model directory or name (default smollm2)")
    p.add_argument("--data-cache", required=True, nargs="+",
                   help="self-distillation caches (.pt) of train-drafter --data-cache, or of "
                        "scripts/make_reference_cache.py (one or more; merged)")
    p.add_argument("--features-cache", default=None, nargs="+",
                   help="where the verifier's features of each --data-cache are cached (.pt, one per cache)")
    p.add_argument("--taps", default=None,
                   help="comma-separated base layers whose outputs the drafter fuses with the final feature "
                        "(EAGLE-3's multi-layer features, e.g. 3,15; default: the --init drafter's, else none)")
    p.add_argument("--taps-cache", default=None, nargs="+",
                   help="where the tapped layers' outputs of each --data-cache are cached (.pt, one per cache)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the drafter (default: the --init drafter's, else 1); more than the "
                        "--init drafter's grows it: the new layers start from a base layer with zeroed output "
                        "projections, so training starts from exactly the --init drafter")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size (default 8192)")
    p.add_argument("--vocab-from-data", action="store_true",
                   help="rank the vocabulary by the training targets alone (not also the splits and the stdlib)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-new", type=float, default=None,
                   help="learning rate of the parameters the --init drafter lacks (grown --layers, a --taps "
                        "fusion), which start at zero or identity and move slowly at a fine-tuning rate "
                        "(default: --lr)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--noise", type=float, default=0.1, help="uniform feature noise, relative to their RMS")
    p.add_argument("--reg-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--target-temp", type=float, default=1.0,
                   help="temperature of the soft targets: below 1 sharpens the verifier's distribution toward "
                        "its top choices, which is what greedy acceptance depends on (default 1: its distribution)")
    p.add_argument("--unroll", type=int, default=1,
                   help="train on the drafter's own predictions for this many chained steps (1: teacher features)")
    p.add_argument("--heldout", type=float, default=0.05, help="share of sequences held out for evaluation")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--feature-batch", type=int, default=16)
    p.add_argument("--init", default=None, help="start from this feature drafter (its weights and vocabulary)")
    p.add_argument("--init-layer", type=int, default=-1, help="base layer the block starts from (default: the last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "vocab", "unroll", "eval_every", "save_every", "log_every", "feature_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr_new is not None and not args.lr_new > 0:
        p.error("--lr-new must be > 0")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    if args.vocab is not None and args.vocab < 1:
        p.error("--vocab must be >= 1")
    if not (math.isfinite(args.target_temp) and args.target_temp > 0):
        p.error("--target-temp must be a finite number > 0")
    if not 0 <= args.heldout < 1:
        p.error("--heldout must lie in [0, 1)")
    if args.taps is not None:
        try:
            args.taps = tuple(int(x) for x in args.taps.split(",") if x.strip())
        except ValueError:
            p.error(f"--taps must be comma-separated layer indices, got {args.taps!r}")
    try:
        return train(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(args) -> int:
    from ..checkpoint import load_model
    from ..feature_drafter import FeatureDrafter, init_extra_blocks, init_from_base, load_feature_drafter
    from ..models import resolve_model
    from ..tokenizer import load_tokenizer

    def log(s: str) -> None:
        print(s, flush=True)

    out = Path(args.out)
    check_writable_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    mdir = resolve_model(args.model, log=log)
    base = load_model(mdir, dtype=torch.bfloat16)
    base.eval()
    for q in base.parameters():
        q.requires_grad_(False)
    c = base.config
    tok = load_tokenizer(mdir)
    if args.features_cache is not None and len(args.features_cache) != len(args.data_cache):
        raise ValueError("--features-cache needs one file per --data-cache")
    if args.taps_cache is not None and len(args.taps_cache) != len(args.data_cache):
        raise ValueError("--taps-cache needs one file per --data-cache")
    state_path = out / STATE
    state = None
    if state_path.exists() and not args.no_resume:
        state = load_state(state_path, "the trainer state")
    start = load_feature_drafter(args.init, c, dtype=torch.float32) if state is None and args.init else None
    if state is not None:
        taps = tuple(state.get("taps", ()))
        if args.taps is not None and tuple(args.taps) != taps:
            raise ValueError(f"{state_path} trains a drafter with taps {list(taps)}, not --taps {list(args.taps)}")
    elif start is not None and start.taps:
        taps = start.taps
        if args.taps is not None and tuple(args.taps) != taps:
            raise ValueError(f"the --init drafter taps layers {list(taps)}, not --taps {list(args.taps)}")
    else:
        taps = tuple(args.taps or ())
    if state is not None:
        layers = int(state.get("layers", 1))
        if args.layers is not None and args.layers != layers:
            raise ValueError(f"{state_path} trains a {layers}-layer drafter, not --layers {args.layers}")
    elif start is not None:
        layers = args.layers if args.layers is not None else start.layers
        if layers < start.layers:
            raise ValueError(f"the --init drafter has {start.layers} layers; --layers {layers} cannot shrink it")
    else:
        layers = args.layers or 1
    FeatureDrafter(c, torch.arange(1), taps, layers)  # bad taps / layers fail here, before any feature is computed
    seq_parts = []
    for dc in args.data_cache:
        seq = load_state(Path(dc), "the self-distillation cache")
        seq_parts.append((seq, seq["tokens"].long(), seq["lengths"].long()))
    Lmax = max(tk.shape[1] for _, tk, _ in seq_parts)
    N = sum(tk.shape[0] for _, tk, _ in seq_parts)
    feats_l: list[torch.Tensor] = []  # each part's valid positions only (a ragged store, no padding)
    tapped_l: list[torch.Tensor] = []
    row = 0
    for i, (_, tk, ln) in enumerate(seq_parts):
        dc, n, L = args.data_cache[i], tk.shape[0], tk.shape[1]
        fc_path = Path(args.features_cache[i]) if args.features_cache else None
        if fc_path is not None and fc_path.exists():
            ft = torch.load(fc_path)
            if tuple(ft.shape[:2]) != tuple(tk.shape):
                raise ValueError(f"{fc_path} holds features of shape {tuple(ft.shape)}, not of the sequences in {dc}")
            log(f"features of {n} sequences from {fc_path}")
        else:
            log(f"computing the verifier's features of {n} sequences of {dc}")
            ft = compute_features(base, tk, ln, batch=args.feature_batch, log=log)
            if fc_path is not None:
                fc_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(ft, fc_path)
        valid_pos = torch.arange(L)[None, :] < ln[:, None]
        feats_l.append(ft[valid_pos])
        del ft
        if taps:
            tc_path = Path(args.taps_cache[i]) if args.taps_cache else None
            tt = torch.load(tc_path) if tc_path is not None and tc_path.exists() else None
            if tt is not None:
                if not isinstance(tt, dict) or tuple(tt.get("taps", ())) != taps or \
                        tuple(tt["states"].shape[:3]) != (n, L, len(taps)):
                    raise ValueError(f"{tc_path} does not hold layers {list(taps)} of the sequences in {dc}")
                log(f"tapped layers {list(taps)} of {n} sequences from {tc_path}")
                tt = tt["states"]
            else:
                log(f"computing the verifier's layers {list(taps)} of {n} sequences of {dc}")
                _, tt = compute_features(base, tk, ln, batch=args.feature_batch, log=log, taps=taps, final=False)
                if tc_path is not None:
                    tc_path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"taps": list(taps), "states": tt}, tc_path)
            tapped_l.append(tt[valid_pos])
            del tt
        row += n
    tokens = torch.cat([F.pad(tk, (0, Lmax - tk.shape[1])) for _, tk, _ in seq_parts])
    lengths = torch.cat([ln for _, _, ln in seq_parts])
    seqs = {"tokens": tokens, "valid": torch.cat([F.pad(q["valid"].bool(), (0, Lmax - q["valid"].shape[1]))
                                                 for q, _, _ in seq_parts])}
    del seq_parts
    feats = Ragged(torch.cat(feats_l), lengths)
    tapped = Ragged(torch.cat(tapped_l), lengths) if taps else None
    del feats_l, tapped_l
    order = list(range(N))
    random.Random(args.seed).shuffle(order)
    n_held = int(round(N * args.heldout))
    held, train_idx = order[:n_held], order[n_held:]
    if state is not None:
        ids = state["ids"]
        log(f"resuming from {state_path} at step {state['step']}")
    elif start is not None:
        ids = start.ids
        log(f"starting from the feature drafter in {args.init}" +
            (f" (taps {list(taps)} added, fused as the final feature alone)" if taps and not start.taps else "") +
            (f" (grown to {layers} layers, the new ones adding nothing yet)" if layers > start.layers else ""))
    else:
        ids = drafter_vocab(mdir, tok, seqs, args.vocab, c.vocab_size, eos_id=c.eos_token_id,
                            mask_id=c.mask_token_id, corpus=not args.vocab_from_data, log=log)
    fd = FeatureDrafter(c, ids, taps, layers)
    if state is not None:
        fd.load_state_dict(state["model"])
    elif start is not None:
        missing, unexpected = fd.load_state_dict(start.state_dict(), strict=False)
        grown = tuple(f"more.{i - 1}." for i in range(start.layers, layers))
        if unexpected or any(not k.startswith(("fuse.", "tap_norms.") + grown) for k in missing):
            raise ValueError(f"the --init drafter does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
        init_extra_blocks(fd, base, first=start.layers, layer=args.init_layer)
    else:
        init_from_base(fd, base, layer=args.init_layer, seed=args.seed)
    fd.float()
    if state is not None:
        new = set(state.get("new_params", []))
    elif start is not None:
        new = {k for k in dict(fd.named_parameters()) if k not in start.state_dict()}
    else:
        new = set()
    params = [q for q in fd.parameters()]
    groups = [{"params": [q for k, q in fd.named_parameters() if k not in new], "scale": 1.0}]
    if new:
        groups.append({"params": [q for k, q in fd.named_parameters() if k in new],
                       "scale": (args.lr_new if args.lr_new is not None else args.lr) / args.lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = 0
    if state is not None:
        opt.load_state_dict(state["opt"])
        for g, want in zip(opt.param_groups, groups):
            g["scale"] = want["scale"]  # this run's --lr-new
        step = int(state["step"])
    gen = torch.Generator().manual_seed(args.seed + step)
    rng = random.Random(args.seed * 7919 + step)
    log(f"feature drafter: {sum(q.numel() for q in params):,} parameters, vocabulary {fd.ids.numel()}, "
        f"{len(train_idx)} training / {len(held)} held-out sequences")

    def lr_at(s: int) -> float:
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        frac = (s - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def evaluate() -> dict:
        if not held:
            return {}
        fd.eval()
        tot: dict[str, float] = {}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, len(held), args.batch):
                b = held[i: i + args.batch]
                _, m = pair_loss(fd, base, feats[b], tokens[b], lengths[b], noise=0.0, reg_weight=args.reg_weight,
                                 ce_weight=args.ce_weight, unroll=max(2, args.unroll),
                                 tapped=None if tapped is None else tapped[b], target_temp=args.target_temp)
                for k, v in m.items():
                    tot[k] = tot.get(k, 0.0) + v * len(b)
        fd.train()
        return {k: round(v / len(held), 4) for k, v in tot.items()}

    def training_info(final: dict | None) -> dict:
        return {"data_cache": str(args.data_cache), "sequences": len(train_idx), "heldout_sequences": len(held),
                "steps": step, "batch": args.batch, "lr": args.lr, "lr_new": args.lr_new, "noise": args.noise,
                "reg_weight": args.reg_weight, "ce_weight": args.ce_weight, "target_temp": args.target_temp,
                "unroll": args.unroll, "init": args.init,
                "taps": list(taps), "layers": layers,
                "heldout_eval": final,
                "command": "trimode train-feature-drafter " + " ".join(
                    sys.argv[2:] if sys.argv[1:2] == ["train-feature-drafter"] else sys.argv[1:])}

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": fd.state_dict(), "opt": opt.state_dict(), "step": step, "ids": fd.ids,
                    "taps": list(taps), "layers": layers, "new_params": sorted(new), "args": vars(args)}, tmp)
        tmp.replace(state_path)
        snap = FeatureDrafter(c, fd.ids, taps, layers)  # the drafter so far, usable while training goes on
        snap.load_state_dict(fd.state_dict())
        snap.to(torch.bfloat16).save(out, training=training_info(None))

    t0 = time.perf_counter()
    fd.train()
    while step < args.steps:
        b = rng.sample(train_idx, min(args.batch, len(train_idx)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["scale"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, m = pair_loss(fd, base, feats[b], tokens[b], lengths[b], noise=args.noise,
                                reg_weight=args.reg_weight, ce_weight=args.ce_weight, gen=gen, unroll=args.unroll,
                                tapped=None if tapped is None else tapped[b], target_temp=args.target_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            tops = " ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("top1"))
            log(f"step {step} loss {float(loss.detach()):.4f} ce {m['ce']:.3f} reg {m['reg']:.4f} {tops} "
                f"lr {lr_at(step - 1):.2e} ({time.perf_counter() - t0:.0f}s)")
        if step % args.eval_every == 0 or step == args.steps:
            log(f"eval step {step} held-out {evaluate()}")
        if step % args.save_every == 0 or step == args.steps:
            save_state()
    final = evaluate()
    fd.to(torch.bfloat16).save(out, training=training_info(final))
    log(f"wrote the feature drafter to {out} (held-out {final})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
