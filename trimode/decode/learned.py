"""The learned unmasking policy for diffusion mode (docs/design-notes.md §9).

After each denoising forward, a small model scores every masked slot of the block with the
probability that its current top-1 is the AR-consistent token (the token AR greedy decoding would
put there). The policy fills every candidate scoring at least `threshold` and, when none does, the
best-scoring one, so every forward makes progress (SGLang `LearnedSampler`'s decision rule).

Two scorers, trained by `trimode train-sampler`: `MLPScorer` looks at one slot at a time;
`BlockScorer` is a small bidirectional transformer over the block's slots, so a slot's score can
depend on its neighbours' confidences. Both read the features of `slot_features`, normalised by
the training set's mean and std. Stored as a directory: `sampler.json` (kind, sizes, feature names,
normalisation, training metrics) and `model.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .policies import RULES, PolicyContext

FEATURES = (
    "p1", "p2", "p3", "p4", "p5", "margin", "entropy", "log_p1", "top5_mass",
    "rel_pos", "frac_masked", "left_filled", "right_filled", "all_left_filled", "dist_left_filled",
    "step", "same_as_left_top1", "conf_rank", "block_max_conf", "block_mean_conf", "n_candidates",
)
N_FEATURES = len(FEATURES)
CONFIG = "sampler.json"
WEIGHTS = "model.safetensors"
KINDS = ("mlp", "transformer")


def slot_features(conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext) -> torch.Tensor:
    """(B, n, F) features of every non-seed canvas slot after a denoising forward (see FEATURES).

    conf, candidates: (B, n); ctx.probs (B, n, V), ctx.proposal (B, n), ctx.filled (B, n + 1).
    Computed for all slots (the block scorer reads filled slots too); only candidates are scored.
    """
    probs = ctx.probs.float()
    B, n, _ = probs.shape
    dev = probs.device
    top = probs.topk(min(5, probs.shape[-1]), dim=-1).values  # (B, n, <=5)
    if top.shape[-1] < 5:
        top = torch.cat([top, top.new_zeros(B, n, 5 - top.shape[-1])], -1)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    filled = ctx.filled.bool()  # (B, n + 1); canvas slot i + 1 is masked slot i
    masked = ~filled[:, 1:]
    i = torch.arange(n, device=dev, dtype=torch.float32)
    rel = (i / max(n - 1, 1)).expand(B, n)
    frac = masked.float().mean(1, keepdim=True).expand(B, n)
    left = filled[:, :n].float()
    right = torch.cat([filled[:, 2:], torch.zeros(B, 1, dtype=torch.bool, device=dev)], 1).float()
    all_left = filled[:, :n].long().cumprod(1).float()
    # Distance (in slots) to the nearest filled slot on the left, over the block length.
    idx = torch.arange(n + 1, device=dev)
    last_filled = torch.where(filled, idx, torch.zeros_like(idx)).cummax(1).values[:, :n]  # canvas index <= i
    dist = ((i + 1) - last_filled.float()) / (n + 1)
    prop = ctx.proposal
    same_left = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=dev), prop[:, 1:] == prop[:, :-1]], 1).float()
    scored = conf.float().masked_fill(~candidates, -1.0)
    order = scored.argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=dev).expand(B, n))
    n_cand = candidates.sum(1, keepdim=True).clamp_min(1)
    conf_rank = (rank.float() / n_cand).clamp(max=1.0)
    cmax = scored.max(1, keepdim=True).values.clamp_min(0).expand(B, n)
    cmean = (conf.float() * candidates).sum(1, keepdim=True) / n_cand
    feats = [
        top, (top[..., 0] - top[..., 1])[..., None], ent[..., None], top[..., :1].clamp_min(1e-12).log(),
        top.sum(-1, keepdim=True),
        rel[..., None], frac[..., None], left[..., None], right[..., None], all_left[..., None], dist[..., None],
        torch.full((B, n, 1), step / (n + 1), device=dev), same_left[..., None], conf_rank[..., None],
        cmax[..., None], cmean.expand(B, n)[..., None], (n_cand.float() / n).expand(B, n)[..., None],
    ]
    out = torch.cat(feats, -1)
    assert out.shape[-1] == N_FEATURES
    return out


class MLPScorer(nn.Module):
    """Per-slot MLP: (B, n, F) -> (B, n) logits; no interaction between slots."""

    def __init__(self, n_features: int = N_FEATURES, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class BlockScorer(nn.Module):
    """A small pre-LN bidirectional transformer over the block's slots: (B, n, F) -> (B, n) logits.

    slots: optional (B, n) bool, the slots that exist (a short last block is padded); padded slots
    are keys for nobody. Slot order enters through a learned position embedding."""

    def __init__(self, n_features: int = N_FEATURES, d_model: int = 64, layers: int = 2, heads: int = 4,
                 max_slots: int = 128) -> None:
        super().__init__()
        self.inp = nn.Linear(n_features, d_model)
        self.pos = nn.Embedding(max_slots, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        B, n, _ = x.shape
        h = self.inp(x) + self.pos(torch.arange(n, device=x.device).clamp(max=self.pos.num_embeddings - 1))[None]
        pad = None if slots is None else ~slots
        h = self.encoder(h, src_key_padding_mask=pad)
        return self.head(self.norm(h)).squeeze(-1)


def build_scorer(kind: str, sizes: dict[str, int]) -> nn.Module:
    if kind == "mlp":
        return MLPScorer(**sizes)
    if kind == "transformer":
        return BlockScorer(**sizes)
    raise ValueError(f"unknown sampler kind {kind!r}; choose one of {KINDS}")


@dataclass
class Sampler:
    """A trained scorer with its feature normalisation."""

    kind: str
    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict[str, Any]

    @torch.no_grad()
    def scores(self, feats: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, F) raw features -> (B, n) probabilities that each slot's top-1 is right."""
        x = (feats.float() - self.mean.to(feats.device)) / self.std.to(feats.device)
        return torch.sigmoid(self.model(x, slots).float())

    def save(self, path: str | Path) -> None:
        from .._io import save_tensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"kind": self.kind, "features": list(FEATURES), "mean": self.mean.tolist(), "std": self.std.tolist(),
               **self.meta}
        (path / CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
        save_tensors(self.model.state_dict(), path / WEIGHTS)  # umask permissions (safetensors alone: 0600)


def load_sampler(path: str | Path) -> Sampler:
    """Load a sampler directory; `path` may also be a parent holding `transformer/` and/or `mlp/`
    (the transformer is preferred)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).exists():
        for kind in ("transformer", "mlp"):
            if (path / kind / CONFIG).exists():
                path = path / kind
                break
        else:
            raise ValueError(f"no trained sampler at {path} (expected {CONFIG}; run `trimode train-sampler`)")
    cfg = json.loads((path / CONFIG).read_text())
    if list(cfg.get("features", [])) != list(FEATURES):
        raise ValueError(f"{path}: sampler was trained on other features ({cfg.get('features')})")
    model = build_scorer(cfg["kind"], cfg["sizes"])
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    model.eval()
    meta = {k: v for k, v in cfg.items() if k not in ("kind", "features", "mean", "std")}
    return Sampler(cfg["kind"], model, torch.tensor(cfg["mean"]), torch.tensor(cfg["std"]), meta)


@dataclass
class LearnedPolicy:
    """Fill by the learned score: rule "each" fills every candidate scoring >= threshold (and always
    the best one); rule "joint" fills the best-scoring candidates while the product of their scores
    stays >= threshold (`policies.joint_select`: a bound on the chance of any wrong fill per forward)."""

    sampler: Sampler
    threshold: float = 0.9
    rule: str = "each"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or math.isnan(self.threshold):
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold!r}")
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {sorted(RULES)}")

    def select(
        self, conf: torch.Tensor, candidates: torch.Tensor, step: int, ctx: PolicyContext | None = None
    ) -> torch.Tensor:
        if ctx is None:
            raise ValueError("the learned policy needs the PolicyContext (probs, filled)")
        s = self.sampler.scores(slot_features(conf, candidates, step, ctx))
        return RULES[self.rule](s, candidates, self.threshold)
