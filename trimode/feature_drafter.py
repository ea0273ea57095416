"""A feature-level drafter: one small transformer layer that drafts from the verifier's own hidden states.

The self-speculative draft pass of linear mode (a whole forward of the model with the draft adapter)
costs about one AR step, so a linear cycle costs two forwards. This drafter follows EAGLE (Li et al.,
"EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", arXiv 2401.15077): it predicts
the verifier's next final-normed hidden state from the current one and the token that was emitted
after it, and reads its draft token through the verifier's own output head. One step is a single
decoder layer of the model's width plus the output head restricted to a draft vocabulary, a few
percent of an AR step, so drafting k tokens one after another costs a fraction of one forward.

Pairs and positions. For committed tokens x_0 .. x_n the verifier's forward gives features f_0 ..
f_n (f_t = final-normed hidden state after x_t, whose head row predicts x_{t+1}). Drafter entry j is
the pair (f_j, embed(x_{j+1})) at position j + 1; its output is the predicted feature f^_{j+1}, whose
head logits draft x_{j+2}. Drafting more steps feeds (f^_{j+1}, embed(draft)) back in. Entries of
verified tokens are committed to the drafter's own one-layer KV cache; drafted ones are scratch.

The drafter only proposes: every emitted token is still the verifier's (decode/featdraft.py), so
greedy output equals AR greedy output and sampling stays lossless whatever the drafter holds.

On disk: `feature_drafter.json` (format, the base shape it fits, its draft vocabulary, how it was
trained) and `feature_drafter.safetensors` (fc, the layer, the norm). The embedding and the output
head are the base model's, not stored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._io import load_tensors, read_header, read_json, save_tensors, write_json
from .cache import KVCache
from .config import ModelConfig
from .model import Block, RMSNorm, _fuse, forward_context, rope_inv_freq

FORMAT = 1
DRAFTER_DIR = "feature_drafter"  # where load_model finds one inside a checkpoint directory
CONFIG_FILE = "feature_drafter.json"
WEIGHTS_FILE = "feature_drafter.safetensors"
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")


class FeatureDrafter(nn.Module):
    """fc(concat(feature, token embedding)) -> one decoder block (or `layers` of them) -> RMSNorm: the
    predicted feature."""

    def __init__(self, base: ModelConfig, ids: torch.Tensor, taps: tuple[int, ...] = (), layers: int = 1) -> None:
        super().__init__()
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= base.num_layers:
            raise ValueError(f"a feature drafter has 1 to {base.num_layers} layers (the base's), got {layers!r}")
        self.base_config = base
        self.layers = layers
        self.config = dataclasses.replace(base, num_layers=layers)
        h = base.hidden_size
        taps = tuple(int(i) for i in taps)
        if any(not 0 <= i < base.num_layers - 1 for i in taps) or list(taps) != sorted(set(taps)):
            raise ValueError(f"a feature drafter's taps must be ascending distinct base layers in "
                             f"[0, {base.num_layers - 1}) (the last layer is the feature itself), got {list(taps)}")
        self.taps = taps
        if taps:  # EAGLE-3's multi-layer features: normed lower-layer states fused with the final feature
            self.tap_norms = nn.ModuleList(RMSNorm(h, base.rms_norm_eps) for _ in taps)
            self.fuse = nn.Linear((len(taps) + 1) * h, h, bias=False)
            with torch.no_grad():  # starts as the final feature alone (a single-layer drafter's input)
                self.fuse.weight.zero_()
                self.fuse.weight[:, len(taps) * h:] = torch.eye(h)
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.block = Block(self.config)
        self.more = nn.ModuleList(Block(self.config) for _ in range(layers - 1))  # layers 1 .. layers - 1
        self.norm = RMSNorm(h, base.rms_norm_eps)
        inv_freq, factor = rope_inv_freq(base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = factor
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0 or bool((ids < 0).any()) or bool((ids >= base.vocab_size).any()):
            raise ValueError(f"a feature drafter's vocabulary must be ids in [0, {base.vocab_size})")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("a feature drafter's vocabulary has repeated ids")
        self.register_buffer("ids", ids, persistent=False)
        self.meta: dict[str, Any] = {}
        self.datastore = None  # a trimode.datastore.NgramStore (datastore.npz beside the weights): one more draft path
        self._rows: tuple | None = None  # (key, head rows of `ids`) gathered from the base head
        self._extra: tuple | None = None  # (extra ids, rows, ids + extra, their head rows): the last request's
        self.int8 = False  # pack_int8(): the layer and the head rows on int8 packed kernels
        self._fc_int8: nn.Module | None = None
        self._head_int8: tuple | None = None  # (rows it was packed from, Int8Packed)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache(self.config, batch_size, capacity, dtype=self.dtype, device=self.fc.weight.device)

    def fuse_features(self, feats: torch.Tensor, tapped: list[torch.Tensor] | None) -> torch.Tensor:
        """The drafter's input feature of verified positions: the final-normed feature itself, or, with
        taps, fuse(concat(norm(tap_1), ..., norm(tap_n), feature)) of the base's layer outputs `tapped`
        at the same positions (the drafter's own predicted features are fed as they are)."""
        if not self.taps:
            return feats
        if tapped is None or len(tapped) != len(self.taps):
            raise ValueError(f"this feature drafter reads base layers {list(self.taps)}: pass their outputs")
        parts = [n(t.to(self.dtype)) for n, t in zip(self.tap_norms, tapped)] + [feats.to(self.dtype)]
        return self.fuse(torch.cat(parts, dim=-1))

    def forward(self, feats: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, *,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Predicted features (B, T, hidden) of entries (feats, embeds) (B, T, hidden) at `positions`
        (B, T). With a cache the entries are written to its scratch slots (never committed here) and
        `mask` is (B, T, S) over its slots; without one, `mask` (B, T, T) or None (causal)."""
        B, T, _ = feats.shape
        fc = self.fc if self._fc_int8 is None else self._fc_int8
        x = fc(torch.cat([feats.to(self.dtype), embeds.to(self.dtype)], dim=-1))
        S = cache.begin(T) if cache is not None else T
        if mask is not None:
            mask = mask.unsqueeze(1) if mask.dim() == 3 else mask
        elif cache is not None:
            from .masks import causal, with_prefix

            mask = with_prefix(causal(T, device=x.device), cache.length, S).unsqueeze(1)
        ctx = forward_context(self.config, self.inv_freq, self.attention_factor, positions, mask, cache, S, x.dtype)
        for i, blk in enumerate(self.blocks()):
            x = blk(x, ctx, i, adapter=None, gate=None)
        return self.norm(x)

    def blocks(self) -> list[Block]:
        return [self.block, *self.more]

    def fuse_projections(self) -> FeatureDrafter:
        """Inference: the layer's q / k / v and gate / up each run as one matmul (their weights become
        views of the fused matrices, as `Transformer.fuse_projections`); not for training. Returns self."""
        for blk in self.blocks():
            a, m = blk.self_attn, blk.mlp
            if a.qkv is None:
                a.qkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
            if m.gate_up is None:
                m.gate_up = _fuse([m.gate_proj, m.up_proj])
        return self

    def pack_int8(self) -> FeatureDrafter:
        """Inference on CPU in bf16: fc, the layer's projections and the head rows of the drafter's
        vocabulary run on `torch._weight_int8pack_mm` (trimode.quant.Int8Packed: int8 weights with a
        scale per output row). A drafter step reads ~18 MB of weights from memory in bf16 (the base's
        forwards between its steps evict them from the caches), half that in int8, at one to three rows,
        where the packed kernel is faster than a bf16 GEMM. Drafts change by the rounding only, never a
        token: the verifier decides what is emitted. The fusion of tapped layers (once per verify, on
        many rows) stays in bf16. Not for training or saving. Returns self."""
        from .quant import Int8Packed, PackedProjections

        if self.int8:
            return self
        if self.dtype != torch.bfloat16 or self.fc.weight.device.type != "cpu":
            raise ValueError(f"the int8 drafter runs PyTorch's packed CPU kernel in bf16; this drafter is "
                             f"{str(self.dtype).replace('torch.', '')} on {self.fc.weight.device.type}")
        self.fuse_projections()
        with torch.no_grad():
            self._fc_int8 = Int8Packed(self.fc.weight, self.fc.bias)
            for blk in self.blocks():
                a, m = blk.self_attn, blk.mlp
                a.qkv = PackedProjections(a.qkv.weight)
                m.gate_up = PackedProjections(m.gate_up.weight)
                a.o_proj.set_quantized(Int8Packed(a.o_proj.weight))
                m.down_proj.set_quantized(Int8Packed(m.down_proj.weight))
        self.int8 = True
        return self

    def head_rows(self, base: nn.Module) -> torch.Tensor:
        """The base output head's rows for `ids` (cached until the base head's weights change)."""
        w = base.head_weight()
        qh = base.quant_head if w.numel() == 0 else None
        key = ((id(qh), qh.q._version) if qh is not None else (w.data_ptr(), w.dtype, w.device, w._version), self.dtype)
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, base._head_rows(self.ids.to(w.device), qh).to(self.dtype))
        return self._rows[1]

    def logits(self, base: nn.Module, h: torch.Tensor, extra: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits of predicted features h (..., hidden) over the drafter's vocabulary plus the ids
        in `extra` (a request's own tokens): (logits (..., n), their token ids (n,))."""
        ids, rows = self.ids.to(h.device), self.head_rows(base)
        if self.int8:
            if self._head_int8 is None or self._head_int8[0] is not rows:
                from .quant import Int8Packed

                self._head_int8 = (rows, Int8Packed(rows))
            z = self._head_int8[1](h.to(rows.dtype))
        else:
            z = F.linear(h.to(rows.dtype), rows)
        if extra is None or not extra.numel():
            return z, ids
        if self._extra is None or self._extra[0] is not extra or self._extra[1] is not rows:
            qh = base.quant_head if base.head_weight().numel() == 0 else None
            extra = extra.to(h.device)
            self._extra = (extra, rows, torch.cat([ids, extra]), base._head_rows(extra, qh).to(rows.dtype))
        _, _, all_ids, extra_rows = self._extra
        return torch.cat([z, F.linear(h.to(rows.dtype), extra_rows)], dim=-1), all_ids

    # -- files -------------------------------------------------------------------------------------
    def save(self, directory: str | Path, **meta: Any) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, d / WEIGHTS_FILE)
        info = {"format": FORMAT, "base": {k: getattr(self.base_config, k) for k in SHAPE_KEYS},
                "dtype": str(self.dtype).replace("torch.", ""), **self.meta, **meta, "taps": list(self.taps),
                "layers": self.layers, "ids": self.ids.tolist()}
        write_json(d / CONFIG_FILE, info)
        return d


def has_feature_drafter(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def load_feature_drafter(directory: str | Path, base: ModelConfig, *, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu") -> FeatureDrafter:
    """Read a feature drafter and check that it fits `base`; a clear ValueError otherwise."""
    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise ValueError(f"{d} holds no feature drafter (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    info = read_json(d / CONFIG_FILE)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{d / CONFIG_FILE}: not a format-{FORMAT} feature drafter")
    shape = info.get("base")
    want = {k: getattr(base, k) for k in SHAPE_KEYS}
    if shape != want:
        diff = {k: (shape.get(k) if isinstance(shape, dict) else None, v) for k, v in want.items()
                if not isinstance(shape, dict) or shape.get(k) != v}
        raise ValueError(f"the feature drafter in {d} does not fit this model: (drafter, model) {diff}")
    ids = info.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{d / CONFIG_FILE}: 'ids' must be a list of token ids")
    taps = info.get("taps", [])
    if not isinstance(taps, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in taps):
        raise ValueError(f"{d / CONFIG_FILE}: 'taps' must be a list of base layer indices")
    layers = info.get("layers", 1)
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise ValueError(f"{d / CONFIG_FILE}: 'layers' must be a whole number")
    fd = FeatureDrafter(base, torch.tensor(ids, dtype=torch.long), tuple(taps), layers)
    names = fd.state_dict()
    header = read_header(d / WEIGHTS_FILE)
    missing = sorted(set(names) - set(header))
    extra = sorted(set(header) - set(names))
    if missing or extra:
        raise ValueError(f"{d / WEIGHTS_FILE}: missing {missing[:4]}, unexpected {extra[:4]}")
    bad = [n for n in names if tuple(header[n].shape) != tuple(names[n].shape)]
    if bad:
        raise ValueError(f"{d / WEIGHTS_FILE}: wrong shapes for {bad[:4]}")
    fd.load_state_dict(dict(load_tensors(d / WEIGHTS_FILE, list(names))))
    fd.meta = {k: v for k, v in info.items() if k not in ("format", "base", "ids", "dtype", "taps", "layers")}
    from .datastore import has_datastore, load_datastore

    if has_datastore(d):  # the model's own earlier continuations, verified as one more path of each tree
        fd.datastore = load_datastore(d, vocab_size=base.vocab_size)
    return fd.to(device=device, dtype=dtype or base_dtype(info))


def base_dtype(info: dict) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(info.get("dtype"), torch.float32)


def init_from_base(fd: FeatureDrafter, model: nn.Module, *, layer: int = -1, seed: int = 0) -> FeatureDrafter:
    """Start the block from one of the base model's layers (the last by default) and fc at [0, I]
    plus small noise (the block first sees the feature alone, then learns to use the token)."""
    src = model.layers[layer]
    fd.block.load_state_dict({k: v for k, v in src.state_dict().items() if ".adapters." not in k}, strict=False)
    g = torch.Generator().manual_seed(seed)
    h = fd.base_config.hidden_size
    with torch.no_grad():
        w = torch.randn(h, 2 * h, generator=g) * 0.02 / (2 * h) ** 0.5 * 10
        w[:, :h] += torch.eye(h) * 0.5
        w[:, h:] += torch.eye(h) * 0.5
        fd.fc.weight.copy_(w)
        fd.fc.bias.zero_()
        fd.norm.weight.copy_(model.norm.weight.detach().float())
    return init_extra_blocks(fd, model, layer=layer)


def init_extra_blocks(fd: FeatureDrafter, model: nn.Module, *, first: int = 1, layer: int = -1) -> FeatureDrafter:
    """Start the drafter's layers `first` .. fd.layers - 1 from the base model's layer `layer` with their
    output projections (o_proj, down_proj) zeroed: each adds nothing to the residual stream at first,
    so a deeper drafter begins as exactly the shallower one it grows from (`--layers` on a trained
    `--init` drafter) and training only adds to it."""
    src = {k: v for k, v in model.layers[layer].state_dict().items() if ".adapters." not in k}
    with torch.no_grad():
        for blk in fd.blocks()[first:]:
            blk.load_state_dict(src, strict=False)
            blk.self_attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()
    return fd
