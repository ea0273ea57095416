"""Weight-only quantization through PyTorch's own packed CPU kernels (no hand-written kernels).

`quantize_model(model, "int8" | "int4")` replaces the weight of every projection (and the output head)
by a packed low-bit copy; activations, norms, attention, the KV cache and any LoRA adapters (the draft
adapter included) stay in their precision on top of the quantized base.

- **int8**: symmetric, one scale per output channel. The forward dequantizes a cache-sized slab of
  rows at a time into the activations' dtype and runs the model's own GEMM (1 byte per weight read
  from memory; the unquantized model's numerics and multi-token scaling). PyTorch's packed
  `_weight_int8pack_mm` is faster for one token but wants bf16 activations and gets slower than
  fp32 GEMMs from a few tokens on (docs/quantization.md), so it is not used.
- **int4**: asymmetric, one (scale, zero) pair per group of `group_size` (32) input weights;
  `torch._weight_int4pack_mm_for_cpu`, w = (q - 8) * scale + zero, activations, scales and zeros in
  bf16 (its fast path; with fp32 ones it runs ~30x slower). A GGUF's Q4_1 blocks (32 weights,
  w = d * q + m) map onto this layout (scale = d, zero = m + 8 d), so `quantize_model(..., gguf=PATH)`
  takes the 4-bit codes from the file as they are instead of re-quantizing dequantized weights
  (`load_model` passes the GGUF a converted model came from); only d and m are rounded from fp16 to
  the kernel's bf16.
  The output head (tied to the embedding, Q8_0 in SmolLM2's GGUF: a scale per 32 weights, which
  int8pack's per-channel layout cannot hold) is re-quantized to int8.

Exactness: int8 keeps the unquantized model's GEMMs, so speculative greedy equals AR greedy exactly
where it does for the unquantized model (float32). int4's packed kernel computes each output row on
its own (bit-identical alone or batched), but it rounds activations to bf16, which turns the last-bit
differences the attention has between a 1-token and a k-token forward into bf16-sized ones: like bf16
models, int4 speculation agrees with int4 AR up to numerical near-ties (measured in
docs/quantization.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4")


def check_scheme(scheme: str | None, device: torch.device | str = "cpu") -> str | None:
    """The scheme, validated for the device (None: no quantization)."""
    if scheme in (None, "", "none"):
        return None
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)} (or none)")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize={scheme!r} runs on PyTorch's packed CPU kernels; it is not supported on "
                         f"{torch.device(device).type} in this version (load the model unquantized there)")
    return scheme


class Int8Weight(nn.Module):
    """W ~ q * scale[:, None]; q int8 (N, K), scale (N,) in bf16 (the kernel's activation dtype)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.out_features, self.in_features = q.shape

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return cls(q, scale)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    CHUNK = 1 << 22  # weights dequantized at a time (16 MB in fp32: stays in the last-level cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T with W dequantized on the fly into x's dtype, a cache-sized slab of rows at a time, then
        the model's own GEMM: reads 1 byte per weight from memory, keeps the unquantized model's numerics
        (its multi-token cost and its batch behaviour), and scales each output channel afterwards."""
        rows = max(1, self.CHUNK // self.in_features)
        scale = self.scale.to(x.dtype)
        if rows >= self.out_features:
            return F.linear(x, self.q.to(x.dtype)) * scale
        return torch.cat([F.linear(x, self.q[i:i + rows].to(x.dtype)) * scale[i:i + rows]
                          for i in range(0, self.out_features, rows)], dim=-1)


class Int8Packed(nn.Module):
    """x W^T (+ bias) through PyTorch's packed `torch._weight_int8pack_mm`: W ~ q * scale[:, None], q int8
    (N, K) with one symmetric scale per output row, bf16 activations and scales (its fast path). For
    the feature drafter only (`FeatureDrafter.pack_int8`): the kernel is ~2.5x faster than a bf16 GEMM
    at one to three rows, the drafter's widths, and slower from a few more on, the base model's verify
    widths. The projections' `weight` stays readable (dequantized) for code that inspects it."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("q", torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).contiguous())
        self.out_features, self.in_features = w.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class PackedProjections:
    """A fused projection group (`FusedProjections`) run as one `Int8Packed` matmul; called like it."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.packed = Int8Packed(weight)

    def __call__(self, x: torch.Tensor, adapter: str | None, gate: torch.Tensor | None) -> torch.Tensor:
        return self.packed(x)


class Int4Weight(nn.Module):
    """Group-wise asymmetric int4: W[n, k] ~ (q[n, k] - 8) * scale[n, g] + zero[n, g], g = k // group.
    Stored packed for the CPU kernel, scales and zeros as (K / group, N, 2) fp32."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> None:
        super().__init__()
        n, k = codes.shape
        if k % group_size or scale.shape != (n, k // group_size) or zero.shape != scale.shape:
            raise ValueError(f"int4: a {n}x{k} weight needs {k // group_size} groups of {group_size} per row")
        self.group_size = group_size
        self.out_features, self.in_features = n, k
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        # bf16: the kernel's fast path wants bf16 activations and scales (fp32 runs 30x slower here)
        self.register_buffer("scales_zeros",
                             torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 32) -> Int4Weight:
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
        g = w.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        codes = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).reshape(n, k)
        return cls(codes, scale, lo + 8 * scale, group_size)

    @classmethod
    def from_q4_1(cls, d: torch.Tensor, m: torch.Tensor, codes: torch.Tensor) -> Int4Weight:
        """GGUF Q4_1 blocks of one matrix: d, m (N, K/32) and codes (N, K) in 0..15, w = d * q + m."""
        d, m = d.float(), m.float()
        return cls(codes, d, m + 8 * d, 32)

    def dequantize(self) -> torch.Tensor:
        """(q - 8) * scale + zero, as (N, K) fp32, through the kernel (slow: tests and checks only)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros).t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(),
                                               self.packed, self.group_size, self.scales_zeros)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _q4_1_blocks(gguf_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{gguf tensor name: (d, m, codes)} for every Q4_1 matrix of the file (rows as stored)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    out = {}
    for t in GGUFReader(str(gguf_path)).tensors:
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        raw = np.asarray(t.data, dtype=np.uint8)
        rows = raw.shape[0]
        blocks = raw.reshape(rows, -1, 20)  # per block: d (fp16), m (fp16), 16 bytes of nibbles
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[:, :, 4:20]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)  # element j, then j + 16
        out[t.name] = (torch.from_numpy(d), torch.from_numpy(m), torch.from_numpy(codes.astype(np.int32)))
    return out


_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _gguf_name(module_name: str) -> str | None:
    parts = module_name.split(".")  # layers.{i}.self_attn.q_proj / layers.{i}.mlp.up_proj
    if len(parts) >= 3 and parts[0] == "layers" and parts[-1] in _GGUF_NAMES:
        return f"blk.{parts[1]}.{_GGUF_NAMES[parts[-1]]}.weight"
    return None


def quantize_model(model, scheme: str, *, group_size: int = 32, gguf: str | Path | None = None):
    """Quantize every projection and the output head of `model` in place (see the module docstring);
    returns the model. gguf: the GGUF file the model was converted from, whose Q4_1 blocks are used
    as they are for int4 (each is checked against the model's weight first)."""
    from .lora import AdaptableLinear

    scheme = check_scheme(scheme, model.device)
    if scheme is None:
        return model
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization})")
    blocks = _q4_1_blocks(Path(gguf)) if scheme == "int4" and gguf is not None else {}
    exact = 0
    n_heads = {"q_proj": model.config.num_heads, "k_proj": model.config.num_kv_heads}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, AdaptableLinear) or name == "lm_head":
                continue
            w = mod.weight
            if scheme == "int8":
                qw = Int8Weight.quantize(w)
            else:
                qw = None
                key = _gguf_name(name)
                if key in blocks:
                    d, m, codes = blocks[key]
                    kind = name.split(".")[-1]
                    if kind in n_heads:  # the converter un-permuted these rows (llama.cpp's rope layout)
                        perm = _unpermute_rows(w.shape[0], n_heads[kind])
                        d, m, codes = d[perm], m[perm], codes[perm]
                    n, k = codes.shape
                    deq = (codes.float().reshape(n, k // 32, 32) * d[..., None] + m[..., None]).reshape(n, k)
                    if torch.equal(deq, w.float()):  # the very weights the converter wrote (fp32)
                        qw, exact = Int4Weight.from_q4_1(d, m, codes), exact + 1
                if qw is None:
                    qw = Int4Weight.quantize(w, group_size)
            mod.set_quantized(qw)
        head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
        model.quant_head = Int8Weight.quantize(head)  # the embedding lookup keeps the full table
        if model.lm_head is not None:
            model.lm_head.set_quantized(model.quant_head)
    model.quantization = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None,
                          "gguf_blocks_used": exact, "head": "int8"}
    return model


def _unpermute_rows(rows: int, n_head: int) -> torch.Tensor:
    """The row order trimode.convert.unpermute_qk produces, as an index into the GGUF's rows."""
    idx = torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)
    return idx
