"""LoRA on named linears, selected per forward call.

Every projection in the model is an `AdaptableLinear`: a bias-free linear that can hold several
named low-rank adapters. Which one is active is an argument of the forward call (`adapter=`), so
there is no global on/off state to forget to reset: the drafter runs with `adapter="draft"`, the
verifier with `adapter=None`, in consecutive calls on the same module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRA(nn.Module):
    """delta(x) = scale * B(A(x)), with A: (r, in) and B: (out, r); scale = alpha / r."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        """A is drawn (Kaiming-uniform, PEFT's default) from `generator` when given, so attaching an
        adapter never consumes the global RNG; B starts at zero (the adapter starts as a no-op)."""
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r = r
        self.alpha = float(alpha)
        self.scale = self.alpha / r
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale


class AdaptableLinear(nn.Module):
    """A bias-free linear whose weight is `.weight` (HF naming), plus optional named adapters."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.adapters = nn.ModuleDict()
        # Inference only: weight + scale * B A per adapter (`merge`), used when the adapter acts on
        # every token of a call; dropped when the adapter is replaced.
        self.merged: dict[str, torch.Tensor] = {}
        # Inference only: a packed low-bit copy of `weight` (trimode.quant) used instead of it.
        self.quantized: nn.Module | None = None

    def set_quantized(self, q: nn.Module) -> None:
        """Use the quantized weight `q` (a module mapping x to x W^T) instead of `weight`, which is dropped
        (replaced by an empty placeholder of its dtype, so `.weight.dtype` still answers)."""
        self.quantized = q
        self.merged.clear()
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device),
                                   requires_grad=False)

    def forward(
        self, x: torch.Tensor, adapter: str | None = None, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (..., in). gate: optional (..., 1) 0/1 weights choosing the tokens the adapter acts on,
        so one fused forward can run drafted tokens with the adapter and verified tokens without."""
        if adapter is not None and gate is None and adapter in self.merged:
            return F.linear(x, self.merged[adapter])
        y = F.linear(x, self.weight) if self.quantized is None else self.quantized(x)
        if adapter is not None and adapter in self.adapters:
            delta = self.adapters[adapter](x)
            y = y + (delta if gate is None else delta * gate)
        return y

    def merge(self, name: str) -> None:
        """Precompute weight + scale * B A for adapter `name` (inference: one matmul instead of three
        per call where the adapter acts on every token; costs one more weight matrix of memory)."""
        if self.quantized is not None:  # a merged copy would be a full-precision weight again
            raise ValueError("cannot merge an adapter into a quantized weight; it runs on top of it unmerged")
        lora = self.adapters[name]
        dt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32  # at least fp32
        with torch.no_grad():
            w = self.weight.to(dt) + lora.scale * (lora.B.to(dt) @ lora.A.to(dt))
        self.merged[name] = w.to(self.weight.dtype)

    def add_adapter(self, name: str, r: int, alpha: float, generator: torch.Generator | None = None) -> LoRA:
        lora = LoRA(self.in_features, self.out_features, r, alpha, generator=generator).to(
            device=self.weight.device, dtype=self.weight.dtype
        )
        self.adapters[name] = lora
        self.merged.pop(name, None)
        return lora
