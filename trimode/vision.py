"""The vision side of a vision-language checkpoint (Mistral3 / Ministral3 VLM layout, as NLD-VLM).

A Pixtral-style encoder turns each image into a grid of patch features; the multimodal projector
merges each `spatial_merge_size` x `spatial_merge_size` patch square into one feature and maps it into
the language model's hidden size. Those features replace the embeddings of the prompt's image
tokens in the prefill, and nothing else changes: every decoding mode then runs on the cached prefix
as it does for text (`trimode.decode.batch.prefill`).

Architecture facts (Pixtral 12B, Mistral AI 2024; Mistral Small 3.1 / Ministral 3; the layout
`transformers`' `PixtralVisionModel` and `Mistral3ForConditionalGeneration` read):

- patches: a bias-free Conv2d with kernel = stride = patch_size, then an RMSNorm (`ln_pre`, eps 1e-5);
  an image's patches are flattened row-major and attend only to each other (no causal mask);
- 2D rotary embedding over the whole head dim: the angle vector of a patch at (row h, column w) is
  [h * f_even, w * f_odd] (f = theta^(-2i/d), i < d/2, split into even and odd i), repeated twice;
- each layer: x + attn(RMSNorm(x)), then + gated MLP (act(gate) * up -> down), RMSNorm eps 1e-5;
- the selected hidden state (`vision_feature_layer`: -1 the last layer's output; 0 the normed patch
  embeddings; a list concatenates several) goes through RMSNorm (the text model's eps), the patch
  merger (unfold of m x m squares, channel-major, then a linear), linear_1, an activation, linear_2;
- the prompt holds, per image, rows of [IMG] x (W / (patch * m)) each ended by [IMG_BREAK], the last
  one's break replaced by [IMG_END]; features fill the [IMG] slots in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisionConfig", "VisionTower", "image_token_grid"]

VISION_MODEL_TYPES = ("mistral3", "ministral3_vlm", "pixtral")
_ACTS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}
# Pixtral's preprocessing defaults (the CLIP normalisation; longest edge 1024), used when the
# checkpoint has no preprocessor_config.json.
PIXTRAL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXTRAL_STD = (0.26862954, 0.26130258, 0.27577711)


def _int(d: dict, key: str, default: Any = None, *, lo: int = 1, hi: int = 1 << 16) -> int:
    v = d.get(key, default)
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        v = v[0]  # a square (h, w) size
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"vision config field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


@dataclass(frozen=True)
class VisionConfig:
    """The vision encoder, the projector and how images become prompt tokens."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    patch_size: int
    text_hidden_size: int
    num_channels: int = 3
    rope_theta: float = 10000.0
    hidden_act: str = "gelu"
    spatial_merge_size: int = 1
    projector_act: str = "gelu"
    projector_bias: bool = False
    feature_layers: tuple[int, ...] = (-1,)
    text_rms_eps: float = 1e-5
    image_token_id: int = 10
    image_break_token_id: int | None = None
    image_end_token_id: int | None = None
    # preprocessing (resize so the longest edge fits, then to multiples of patch * merge; normalise)
    longest_edge: int = 1024
    image_mean: tuple[float, float, float] = PIXTRAL_MEAN
    image_std: tuple[float, float, float] = PIXTRAL_STD
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def unit(self) -> int:
        """Image sides are multiples of this (one merged token per unit x unit pixels)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, text_hidden_size: int, text_rms_eps: float,
                     preprocessor: dict[str, Any] | None = None) -> VisionConfig:
        """From a Mistral3-style config.json (top level: vision_config, spatial_merge_size, ...)."""
        v = raw.get("vision_config")
        if not isinstance(v, dict):
            raise ValueError("config.json has no vision_config object")
        hidden = _int(v, "hidden_size")
        heads = _int(v, "num_attention_heads")
        head_dim = v.get("head_dim") or hidden // heads
        if hidden % heads or head_dim * heads != hidden or head_dim % 4:
            raise ValueError(f"vision_config: hidden_size {hidden} must split into num_attention_heads {heads} "
                             "heads whose size is a multiple of 4 (2D rotary embedding)")
        rope = v.get("rope_parameters") or {}
        theta = rope.get("rope_theta", v.get("rope_theta", 10000.0))
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"vision_config: rope_type {rope.get('rope_type')!r} is not supported (axial only)")
        acts = (v.get("hidden_act", "gelu"), raw.get("projector_hidden_act", "gelu"))
        for a in acts:
            if a not in _ACTS:
                raise ValueError(f"activation {a!r} is not supported; use one of {sorted(_ACTS)}")
        layers = raw.get("vision_feature_layer", -1)
        layers = (layers,) if isinstance(layers, int) else tuple(layers) if isinstance(layers, list) else ()
        n = _int(v, "num_hidden_layers", lo=1, hi=256)
        if len(layers) != 1 or isinstance(layers[0], bool) or not isinstance(layers[0], int) \
                or not -n - 1 <= layers[0] <= n:
            raise ValueError(f"vision_feature_layer {raw.get('vision_feature_layer')!r}: one layer index in "
                             f"[-{n + 1}, {n}] (several concatenated layers are not supported)")
        pre = preprocessor or {}
        size = pre.get("size") or {}
        longest = size.get("longest_edge", v.get("image_size", 1024)) if isinstance(size, dict) else 1024
        mean = tuple(float(x) for x in pre.get("image_mean", PIXTRAL_MEAN))
        std = tuple(float(x) for x in pre.get("image_std", PIXTRAL_STD))
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError("preprocessor image_mean / image_std must hold 3 values (std > 0)")
        image_token = raw.get("image_token_index", raw.get("image_token_id", 10))
        return cls(
            hidden_size=hidden, intermediate_size=_int(v, "intermediate_size"), num_layers=n, num_heads=heads,
            head_dim=head_dim, patch_size=_int(v, "patch_size", lo=1, hi=1024),
            text_hidden_size=text_hidden_size, num_channels=_int(v, "num_channels", 3, hi=4),
            rope_theta=float(theta), hidden_act=acts[0],
            spatial_merge_size=_int(raw, "spatial_merge_size", 1, hi=16), projector_act=acts[1],
            projector_bias=bool(raw.get("multimodal_projector_bias", False)), feature_layers=layers,
            text_rms_eps=float(text_rms_eps), image_token_id=_int({"i": image_token}, "i", lo=0, hi=1 << 24),
            longest_edge=_int({"e": longest}, "e", lo=1, hi=1 << 15), image_mean=mean, image_std=std,
            extra={"vision_config": v},
        )

    def with_tokens(self, image_break: int | None, image_end: int | None) -> VisionConfig:
        from dataclasses import replace

        return replace(self, image_break_token_id=image_break, image_end_token_id=image_end)

    def to_hf_dict(self) -> dict[str, Any]:
        """The top-level fields of a Mistral3-style config.json that describe the vision side."""
        v = dict(self.extra.get("vision_config") or {})
        v.update(model_type="pixtral", hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, head_dim=self.head_dim,
                 patch_size=self.patch_size, num_channels=self.num_channels, hidden_act=self.hidden_act,
                 image_size=self.longest_edge, rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})
        layers = self.feature_layers[0] if len(self.feature_layers) == 1 else list(self.feature_layers)
        return {"vision_config": v, "spatial_merge_size": self.spatial_merge_size,
                "projector_hidden_act": self.projector_act, "multimodal_projector_bias": self.projector_bias,
                "vision_feature_layer": layers, "image_token_index": self.image_token_id}


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _Attention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.c = c
        d = c.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N, _ = x.shape
        H, D = self.c.num_heads, self.c.head_dim
        q = self.q_proj(x).view(N, H, D).transpose(0, 1)  # (H, N, D)
        k = self.k_proj(x).view(N, H, D).transpose(0, 1)
        v = self.v_proj(x).view(N, H, D).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # every patch sees its image
        return self.o_proj(out.transpose(0, 1).reshape(N, H * D))


class _Layer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = _RMSNorm(c.hidden_size, 1e-5)
        self.attention = _Attention(c)
        self.ffn_norm = _RMSNorm(c.hidden_size, 1e-5)
        self.feed_forward = nn.Module()
        self.feed_forward.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.feed_forward.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.feed_forward.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = _ACTS[c.hidden_act]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        f = self.feed_forward
        h = self.ffn_norm(x)
        return x + f.down_proj(self.act(f.gate_proj(h)) * f.up_proj(h))


class _Encoder(nn.Module):
    """Pixtral-style encoder (parameter names as stored under `vision_tower.`)."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.c = c
        self.patch_conv = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size,
                                    bias=False)
        self.ln_pre = _RMSNorm(c.hidden_size, 1e-5)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))
        d = c.head_dim
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq_h", inv[0::2].clone(), persistent=False)
        self.register_buffer("inv_freq_w", inv[1::2].clone(), persistent=False)

    def rotary(self, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.inv_freq_h.device
        rows = torch.arange(h, device=dev, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, device=dev, dtype=torch.float32).repeat(h)
        ang = torch.cat([rows[:, None] * self.inv_freq_h[None], cols[:, None] * self.inv_freq_w[None]], dim=-1)
        ang = torch.cat([ang, ang], dim=-1)  # (N, D)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (C, H, W), sides multiples of patch_size -> the hidden states (N, hidden) the config's
        feature layers name: index 0 is the normed patch embeddings, i the output of layer i."""
        dt = self.patch_conv.weight.dtype
        grid = self.patch_conv(pixels.to(dt)[None])[0]  # (hidden, h, w)
        _, h, w = grid.shape
        x = self.ln_pre(grid.flatten(1).t())  # (h * w, hidden), row-major
        cos, sin = self.rotary(h, w, x.dtype)
        states = [x]
        for layer in self.transformer.layers:
            x = layer(x, cos, sin)
            states.append(x)
        return states


class _PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.m = c.spatial_merge_size
        self.merging_layer = nn.Linear(c.hidden_size * self.m ** 2, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        m = self.m
        d = x.shape[-1]
        grid = x.view(h, w, d).permute(2, 0, 1)[None]  # (1, d, h, w)
        squares = F.unfold(grid, kernel_size=m, stride=m)[0]  # (d * m * m, L): channel-major, row-major blocks
        return self.merging_layer(squares.t())


class _Projector(nn.Module):
    """RMSNorm, patch merger, linear_1, activation, linear_2 (names as under `multi_modal_projector.`)."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.norm = _RMSNorm(c.hidden_size, c.text_rms_eps)
        self.patch_merger = _PatchMerger(c)  # also at merge size 1 (a plain linear then), as stored
        self.linear_1 = nn.Linear(c.hidden_size, c.text_hidden_size, bias=c.projector_bias)
        self.act = _ACTS[c.projector_act]
        self.linear_2 = nn.Linear(c.text_hidden_size, c.text_hidden_size, bias=c.projector_bias)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.patch_merger(self.norm(x), h, w)
        return self.linear_2(self.act(self.linear_1(x)))


class VisionTower(nn.Module):
    """Encoder + projector: `encode(pixels)` -> (tokens, text_hidden) features for one image's [IMG] slots."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = _Encoder(config)
        self.multi_modal_projector = _Projector(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.patch_conv.weight.dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (C, H, W) preprocessed (`trimode.images.preprocess`), H and W multiples of
        patch_size * spatial_merge_size. Returns (H / unit * W / unit, text_hidden)."""
        c = self.config
        if pixels.dim() != 3 or pixels.shape[0] != c.num_channels:
            raise ValueError(f"pixels must be ({c.num_channels}, H, W), got {tuple(pixels.shape)}")
        H, W = pixels.shape[1:]
        if H % c.unit or W % c.unit or H == 0 or W == 0:
            raise ValueError(f"image sides must be positive multiples of {c.unit} pixels, got {H} x {W}")
        dev = self.vision_tower.patch_conv.weight.device
        states = self.vision_tower(pixels.to(dev))
        return self.multi_modal_projector(states[c.feature_layers[0]], H // c.patch_size, W // c.patch_size)


def image_token_grid(config: VisionConfig, height: int, width: int) -> list[int]:
    """The prompt tokens one preprocessed image of height x width pixels stands for: rows of [IMG]
    each ended by [IMG_BREAK], the last break replaced by [IMG_END] (without break / end ids: the
    [IMG] tokens alone)."""
    rows, cols = height // config.unit, width // config.unit
    img, brk, end = config.image_token_id, config.image_break_token_id, config.image_end_token_id
    if brk is None or end is None:
        return [img] * (rows * cols)
    out: list[int] = []
    for _ in range(rows):
        out += [img] * cols + [brk]
    out[-1] = end
    return out


def pixel_budget(config: VisionConfig) -> int:
    """Pixels of the largest image after resizing (longest_edge squared, rounded up to the unit)."""
    side = math.ceil(config.longest_edge / config.unit) * config.unit
    return side * side
