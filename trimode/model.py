"""The Ministral3-family decoder used by every mode.

The model knows masks, never modes: `forward(tokens, positions, mask=, cache=, adapter=)`. AR,
diffusion and speculation differ only in which tokens go in, which mask is built and what is done
with the logits; all of that lives in `trimode.decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .lora import AdaptableLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (at least), as the HF reference does, then cast back.
        dt = x.dtype
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) and the cos/sin multiplier; plain RoPE or YaRN (arXiv 2309.00071)."""
    dim = config.head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_extra = 1.0 / pos_freqs
    y = config.yarn
    if y is None:
        return inv_extra, 1.0
    inv_inter = 1.0 / (y.factor * pos_freqs)

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(y.original_max_position_embeddings / (num_rot * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_factor = 1 - ramp  # 1 where we extrapolate (high frequencies), 0 where we interpolate
    inv = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    return inv, y.resolved_attention_factor()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True)
class ForwardContext:
    """What every layer of one forward shares: rotary tables (B, 1, T, D), the llama-4 query scale
    (B, 1, T, 1) or None, the attention mask (B, 1, T, S) or None (causal), the cache and its width S."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_scale: torch.Tensor | None
    mask: torch.Tensor | None
    cache: KVCache | None
    S: int


def forward_context(c: ModelConfig, inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor,
                    mask: torch.Tensor | None, cache: KVCache | None, S: int, dtype: torch.dtype) -> ForwardContext:
    """The rotary tables (and llama-4 query scale) of `positions` (B, T) with the mask and cache of one forward."""
    # Rotary tables in fp32, as in the reference, then cast to the activation dtype.
    freqs = positions[..., None].float() * inv_freq[None, None, :]  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_factor).to(dtype)[:, None]  # (B, 1, T, D)
    sin = (emb.sin() * attention_factor).to(dtype)[:, None]
    q_scale = None
    if c.llama4_scaling_beta is not None:
        s = 1 + c.llama4_scaling_beta * torch.log1p(torch.floor(positions.float() / c.llama4_original_max))
        q_scale = s.to(dtype)[:, None, :, None]  # (B, 1, T, 1)
    return ForwardContext(cos, sin, q_scale, mask, cache, S)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.q_proj = AdaptableLinear(c.hidden_size, c.q_dim)
        self.k_proj = AdaptableLinear(c.hidden_size, c.kv_dim)
        self.v_proj = AdaptableLinear(c.hidden_size, c.kv_dim)
        self.o_proj = AdaptableLinear(c.q_dim, c.hidden_size)
        self.qkv: FusedProjections | None = None  # fuse_projections(): q, k, v in one matmul

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int, *, adapter: str | None,
                gate: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        y = None if self.qkv is None else self.qkv(x, adapter, gate)
        if y is not None:
            q, k, v = y.split([c.q_dim, c.kv_dim, c.kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x, adapter, gate), self.k_proj(x, adapter, gate), self.v_proj(x, adapter, gate)
        q = q.reshape(B, T, c.num_heads, c.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q = q * ctx.cos + rotate_half(q) * ctx.sin
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        if ctx.q_scale is not None:
            q = q * ctx.q_scale  # llama-4 query temperature, after RoPE, queries only
        if ctx.cache is not None:
            k, v = ctx.cache.write(layer, k, v, ctx.S)  # (B, H_kv, S, D)
        if ctx.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, c.q_dim)
        return self.o_proj(out, adapter, gate)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = AdaptableLinear(config.hidden_size, config.intermediate_size)
        self.up_proj = AdaptableLinear(config.hidden_size, config.intermediate_size)
        self.down_proj = AdaptableLinear(config.intermediate_size, config.hidden_size)
        self.gate_up: FusedProjections | None = None  # fuse_projections(): gate and up in one matmul

    def forward(self, x: torch.Tensor, adapter: str | None, gate: torch.Tensor | None) -> torch.Tensor:
        y = None if self.gate_up is None else self.gate_up(x, adapter, gate)
        if y is not None:
            g, u = y.chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u, adapter, gate)
        a = F.silu(self.gate_proj(x, adapter, gate)) * self.up_proj(x, adapter, gate)
        return self.down_proj(a, adapter, gate)


class FusedProjections:
    """Several projections of the same input run as one matmul (inference, `fuse_projections`).

    - no adapter on them: x W^T with W their weights stacked by rows (the projections' weights become
      views of W: no extra memory);
    - an adapter merged into every one of them (`merge_adapter`), no per-token gate: x W_a^T with W_a
      their merged weights stacked the same way (the merged copies become views of it);
    - an adapter with a per-token gate (quadratic forwards and the fused prefill, where drafted and
      verified tokens share a forward): x W^T + gate * (x A^T) B^T, with A the adapters' A matrices
      stacked (one small matmul) and B block-diagonal with the LoRA scales folded in. A token whose
      gate is 0 gets x W^T exactly, as in an unadapted forward.
    Returns None for a call it cannot serve (the caller then runs the projections one by one)."""

    def __init__(self, linears: list[AdaptableLinear]) -> None:
        self.linears = linears
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in linears], dim=0)
        start = 0
        for m in linears:
            n = m.out_features
            m.weight = nn.Parameter(self.weight[start:start + n], requires_grad=False)
            start += n
        self.names = set().union(*(m.adapters.keys() for m in linears))
        self._mods = {n: [m.adapters[n] if n in m.adapters else None for m in linears] for n in self.names}
        self.merged: dict[str, torch.Tensor] = {}
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.names:
            if all(name in m.merged or name not in m.adapters for m in linears):
                with torch.no_grad():
                    w = torch.cat([m.merged.get(name, m.weight).detach() for m in linears], dim=0)
                start = 0
                for m in linears:
                    if name in m.merged:
                        m.merged[name] = w[start:start + m.out_features]
                    start += m.out_features
                self.merged[name] = w
            self.lora[name] = self._stack_lora(name)

    def _stack_lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        ms = self.linears
        r = [m.adapters[name].r if name in m.adapters else 0 for m in ms]
        w = self.weight
        A = torch.zeros(sum(r), w.shape[1], dtype=w.dtype, device=w.device)
        B = torch.zeros(w.shape[0], sum(r), dtype=w.dtype, device=w.device)
        row = col = 0
        with torch.no_grad():
            for m, k in zip(ms, r):
                if k:
                    lora = m.adapters[name]
                    A[col:col + k] = lora.A.detach().to(w.dtype)
                    B[row:row + m.out_features, col:col + k] = (lora.B.detach().float() * lora.scale).to(w.dtype)
                row += m.out_features
                col += k
        return A, B

    def __call__(self, x: torch.Tensor, adapter: str | None, gate: torch.Tensor | None) -> torch.Tensor | None:
        if adapter is None:
            return F.linear(x, self.weight)
        now = [m.adapters[adapter] if adapter in m.adapters else None for m in self.linears]
        if not any(now):
            return F.linear(x, self.weight)
        if adapter not in self.names or any(a is not b for a, b in zip(now, self._mods[adapter])):
            return None  # attached or replaced after fusing: the projections run one by one
        if gate is None and adapter in self.merged:
            return F.linear(x, self.merged[adapter])
        if gate is None:
            return None
        A, B = self.lora[adapter]
        return F.linear(x, self.weight) + F.linear(F.linear(x, A), B) * gate


def _fuse(linears: list[AdaptableLinear]) -> FusedProjections | None:
    """The projections `linears` fused (see FusedProjections); None when any is quantized."""
    if any(m.quantized is not None for m in linears):
        return None
    return FusedProjections(linears)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int, *, adapter: str | None,
                gate: torch.Tensor | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx, layer, adapter=adapter, gate=gate)
        return h + self.mlp(self.post_attention_layernorm(h), adapter, gate)


class Transformer(nn.Module):
    """Embedding, N pre-norm blocks, final norm, output head (tied or untied)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else AdaptableLinear(config.hidden_size, config.vocab_size)
        inv_freq, attn_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_attention_factor = attn_factor
        # Measured decoding defaults stored with a checkpoint (decoding.json, `trimode.models`).
        self.decoding: dict = {}
        # Weight-only quantization (trimode.quant): the scheme, and the packed output head.
        self.quantization: dict | None = None
        self.quant_head: nn.Module | None = None
        # compile_decode(): the compiled block stack for decode forwards of up to compile_max_tokens.
        self._compiled = None
        self.compile_max_tokens = 0
        self._vision: list = []  # a VLM's vision tower (trimode.vision), held outside the module tree
        # set_draft_vocab(): the token ids draft passes score (None: the whole vocabulary), and the
        # gathered rows of the output head for them (rebuilt when the head's weights change).
        self.draft_vocab: torch.Tensor | None = None
        self._draft_rows: tuple | None = None
        self._feature_drafter: list = []  # set_feature_drafter(): an EAGLE-style drafter, outside the module tree

    @property
    def vision(self):
        """The vision tower + projector of a vision-language checkpoint (`trimode.vision.VisionTower`),
        else None. Kept out of `state_dict()` / `parameters()`: the text model's weights, adapters,
        training and quantization are those of the language model alone."""
        return self._vision[0] if self._vision else None

    def set_vision(self, tower) -> None:
        """Attach (or, with None, detach) a vision tower; see `vision`."""
        self._vision = [] if tower is None else [tower]

    @property
    def feature_drafter(self):
        """The feature-level drafter (`trimode.feature_drafter.FeatureDrafter`) linear mode can draft
        with (`drafter="feature"`), else None. Kept out of `state_dict()` / `parameters()`."""
        return self._feature_drafter[0] if self._feature_drafter else None

    def set_feature_drafter(self, fd) -> Transformer:
        """Attach (or with None detach) a feature drafter; it is moved to this model's device and dtype."""
        if fd is not None:
            c, b = self.config, fd.base_config
            if (b.vocab_size, b.hidden_size) != (c.vocab_size, c.hidden_size):
                raise ValueError(f"the feature drafter fits a model of vocabulary {b.vocab_size} and width "
                                 f"{b.hidden_size}, not {c.vocab_size} and {c.hidden_size}")
            fd = fd.to(device=self.device, dtype=self.dtype).eval()
            for p in fd.parameters():
                p.requires_grad_(False)
        self._feature_drafter = [] if fd is None else [fd]
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def adapter_names(self) -> set[str]:
        return adapter_names(self)

    def set_draft_vocab(self, ids) -> Transformer:
        """Score draft passes over these token ids only (None: the whole vocabulary again).

        A draft pass needs the output head for its proposals alone, and on a memory-bound forward
        the head's weights are a large share of the bytes read (SmolLM2-135M: 49152 x 576, a fifth
        of the model). With a draft vocabulary the draft head reads only those rows and every other
        token gets -inf, so a token outside it is never drafted. Verify passes, AR steps and
        diffusion keep the whole vocabulary, so greedy output is unchanged and sampling stays lossless
        (the draft distribution q is a distribution over the subset, which the acceptance rules allow).
        """
        if ids is None:
            self.draft_vocab, self._draft_rows = None, None
            return self
        t = torch.as_tensor(ids)
        if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError("a draft vocabulary is a non-empty 1-d list of integer token ids")
        t = torch.unique(t.long())  # sorted, no repeats
        V = self.config.vocab_size
        if int(t[0]) < 0 or int(t[-1]) >= V:
            raise ValueError(f"draft vocabulary ids must lie in [0, {V}); got {int(t[0])} .. {int(t[-1])}")
        self.draft_vocab, self._draft_rows = t, None
        return self

    def draft_head(self, h: torch.Tensor, *, adapter: str | None = None, gate: torch.Tensor | None = None,
                   extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (..., V) of a draft pass's final-normed hidden states: `head`, restricted to
        `draft_vocab` and the ids in `extra` when a draft vocabulary is set (other ids -inf; decoders
        pass the tokens of their rows' prompts and outputs as `extra`, which models copy). An untied
        head with an adapter of its own in this pass keeps the whole head."""
        if self.draft_vocab is None or (self.lm_head is not None and adapter in self.lm_head.adapters):
            return self.head(h, adapter=adapter, gate=gate)
        w = self.head_weight()
        qh = self.quant_head if w.numel() == 0 else None  # an untied head whose weights are int8 codes now
        key = (id(qh), qh.q._version) if qh is not None else (w.data_ptr(), w.dtype, w.device, w._version)
        if self._draft_rows is None or self._draft_rows[0] != key:
            ids = self.draft_vocab.to(h.device)
            self._draft_rows = (key, ids, self._head_rows(ids, qh))
        _, ids, rows = self._draft_rows
        sub = F.linear(h, rows.to(h.dtype))
        out = sub.new_full((*h.shape[:-1], self.config.vocab_size), float("-inf"))
        out.index_copy_(-1, ids, sub)
        if extra is not None and extra.numel():
            extra = extra.to(h.device)
            out.index_copy_(-1, extra, F.linear(h, self._head_rows(extra, qh).to(h.dtype)))
        return out

    def _head_rows(self, ids: torch.Tensor, quantized=None) -> torch.Tensor:
        """Rows `ids` of the output head's weight (dequantized from int8 codes for a quantized untied head)."""
        if quantized is not None:
            return quantized.q.index_select(0, ids).float() * quantized.scale.index_select(0, ids)[:, None]
        return self.head_weight().detach().index_select(0, ids)

    def _trunk(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None, S: int, adapter: str | None, gate: torch.Tensor | None,
               embeds: torch.Tensor | None = None, taps: tuple[int, ...] = ()
               ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedding, rotary tables and the blocks (the part `compile_decode` compiles); with `taps`,
        also the outputs of those layers (the residual stream after layer i, not normed)."""
        dt = self.dtype
        x = self.embed_tokens(tokens) if embeds is None else embeds.to(dt)  # (B, T, hidden)
        ctx = forward_context(self.config, self.inv_freq, self.rope_attention_factor, positions, mask, cache, S, dt)
        kept = []
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i, adapter=adapter, gate=gate)
            if i in taps:
                kept.append(x)
        return (x, kept) if taps else x

    def fuse_projections(self) -> Transformer:
        """Inference: q / k / v and gate / up each run as one matmul (see FusedProjections: unadapted
        calls, merged-adapter draft passes and gated quadratic forwards); the projections' weights
        become views of the fused matrices. Call after the adapters are final (merged or not): an
        adapter attached later runs unfused. Not for training (the views are frozen). Returns the model."""
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
            m.gate_up = _fuse([m.gate_proj, m.up_proj])
        return self

    def compile_decode(self, *, max_tokens: int = 128, mode: str | None = None) -> Transformer:
        """Compile the embedding, rotary tables and block stack (`torch.compile`, static shapes) for
        the decode forwards of at most `max_tokens` tokens on a cache: they attend over all of the
        cache's slots (the unwritten ones masked), so a forward's shapes depend on its batch and width
        only, not on how much is cached, and one graph serves a whole generation; caches come in
        power-of-two capacities. Longer forwards (prefill) run eagerly. mode: torch.compile's (e.g.
        "reduce-overhead": CUDA graphs on a GPU). Returns the model."""
        _compile_options()
        self.compile_max_tokens = int(max_tokens)
        self._compiled = torch.compile(self._trunk, dynamic=False, mode=mode)
        return self

    def add_adapter(
        self, name: str, *, targets: tuple[str, ...] = ("o_proj",), r: int = 8, alpha: float = 16.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Attach a fresh LoRA named `name` to every linear whose name ends with one of `targets`.
        `generator` (CPU) draws the LoRA A matrices, in module order; without it they come from the
        global RNG."""
        hit = 0
        for mod_name, m in self.named_modules():
            if isinstance(m, AdaptableLinear) and mod_name.split(".")[-1] in targets:
                m.add_adapter(name, r, alpha, generator=generator)
                hit += 1
        if hit == 0:
            raise ValueError(f"no linear named {targets} to attach adapter {name!r} to")

    def merge_adapter(self, name: str) -> None:
        """Inference speed-up: calls with `adapter=name` and no per-token gate (the linear draft pass)
        use precomputed merged weights instead of base + LoRA; the adapter itself is unchanged. The
        merged copy is not updated by training: merge only a finished adapter."""
        hit = 0
        for m in self.modules():
            if isinstance(m, AdaptableLinear) and name in m.adapters:
                m.merge(name)
                hit += 1
        if hit == 0:
            raise ValueError(f"the model has no adapter {name!r} to merge")

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        if self._compiled is not None:  # a few capacities (powers of two), so compiled graphs are reused
            capacity = min(max(256, 1 << (int(capacity) - 1).bit_length()), max(capacity, self.config.max_seq_len))
        return KVCache(self.config, batch_size, capacity, dtype=self.dtype, device=self.device)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        adapter: str | None = None,
        adapter_tokens: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        hidden: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for `tokens`.

        tokens: (B, T) ids. positions: (B, T) absolute positions (RoPE); defaults to
        cache.length + arange(T), or arange(T) without a cache. mask: bool (B, T, S) or (T, S)
        over key slots (the cache's slots [0, S) when a cache is given, else the T tokens);
        None means causal. cache: written at each row's scratch slots, never committed here.
        adapter: name of the LoRA adapter active in this call (None: base weights).
        adapter_tokens: optional bool (B, T): the adapter acts only on these tokens (others use the
        base weights), for fused forwards that mix drafted and verified tokens.
        logits_at: optional (B, n) indices into T; only those positions get the output head.
        inputs_embeds: optional (B, T, hidden) input embeddings used instead of looking `tokens` up (a
        VLM prefill: image features at the image tokens' slots, `trimode.images.embed_prompts`).
        Returns (B, T, V) logits, or (B, n, V) with `logits_at`. hidden=True stops before the output
        head and returns (h, gate) instead (see `features`); `head(h, adapter=, gate=)` finishes it.
        """
        h, gate = self.features(tokens, positions, mask=mask, cache=cache, adapter=adapter,
                                adapter_tokens=adapter_tokens, at=logits_at, inputs_embeds=inputs_embeds)
        return (h, gate) if hidden else self.head(h, adapter=adapter, gate=gate)

    def head(self, h: torch.Tensor, *, adapter: str | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (..., V) of final-normed hidden states h (..., hidden) from `features`."""
        if self.lm_head is None:
            return F.linear(h, self.embed_tokens.weight) if self.quant_head is None else self.quant_head(h)
        return self.lm_head(h, adapter, gate)

    def features(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        adapter: str | None = None,
        adapter_tokens: torch.Tensor | None = None,
        at: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        taps: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """The forward without the output head: final-normed hidden states (B, T, hidden), or
        (B, n, hidden) at the indices `at`, and the adapter gate of those tokens (or None), for
        `head`; with `taps` (layer indices, ascending) a third item, the outputs of those layers at
        the same rows (a multi-layer feature drafter reads them). A decoder that needs logits for
        only some of the returned rows (quadratic: one sub-block of drafts, chosen by the
        verification in the same forward) applies `head` to those."""
        c = self.config
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        dev = self.device
        tokens = tokens.to(dev)
        if positions is None:
            base = cache.length[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=dev)
            positions = base + torch.arange(T, device=dev)[None, :]
        positions = positions.to(dev)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must match tokens {tuple(tokens.shape)}")
        if bool((positions >= c.max_seq_len).any()) or bool((positions < 0).any()):
            raise ValueError(f"positions must lie in [0, {c.max_seq_len}) (max_seq_len)")
        S = cache.begin(T) if cache is not None else T
        compiled = (self._compiled is not None and cache is not None and T <= self.compile_max_tokens
                    and inputs_embeds is None)  # a VLM prefill (inputs_embeds) runs eagerly
        if mask is None and cache is not None:
            # Plain causal call on top of the cache.
            from .masks import causal, with_prefix

            mask = with_prefix(causal(T, device=dev), cache.length, S)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.unsqueeze(0).expand(B, -1, -1)
            if mask.shape != (B, T, S):
                raise ValueError(f"mask must be (B, T, S) = {(B, T, S)}, got {tuple(mask.shape)}")
            mask = mask.to(dev)
            if compiled:  # static shapes: attend over every cache slot, the unwritten ones masked out
                mask = torch.nn.functional.pad(mask, (0, cache.capacity - S), value=False)
            mask = mask.unsqueeze(1)  # (B, 1, T, S), broadcast over heads
        if compiled:
            S = cache.capacity

        gate = None
        if adapter is not None and adapter_tokens is not None:
            gate = adapter_tokens.to(device=dev, dtype=self.dtype)[..., None]  # (B, T, 1)
        if inputs_embeds is not None:
            if inputs_embeds.shape != (B, T, c.hidden_size):
                raise ValueError(f"inputs_embeds must be (B, T, hidden) = {(B, T, c.hidden_size)}, "
                                 f"got {tuple(inputs_embeds.shape)}")
            inputs_embeds = inputs_embeds.to(dev)
        taps = tuple(int(i) for i in taps)
        if any(not 0 <= i < c.num_layers for i in taps) or list(taps) != sorted(set(taps)):
            raise ValueError(f"taps must be ascending distinct layer indices in [0, {c.num_layers}), got {taps}")
        x = (self._compiled if compiled else self._trunk)(tokens, positions, mask, cache, S, adapter, gate,
                                                          inputs_embeds, taps)
        kept = None
        if taps:
            x, kept = x
        if at is not None:
            idx = at.to(dev)
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, n, hidden)
            if kept is not None:
                kept = [torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1])) for t in kept]
            if gate is not None:
                gate = torch.gather(gate, 1, idx[..., None])
        return (self.norm(x), gate) if kept is None else (self.norm(x), gate, kept)


def _compile_options() -> None:
    import torch._dynamo

    # one graph per (batch, width, adapter) of the decode forwards: AR, draft, verify, quadratic, ...
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def init_weights(model: Transformer, *, seed: int = 0, std: float = 0.02) -> Transformer:
    """Seeded normal init (N(0, std), norms at 1) using a private generator: no global RNG touched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif ".adapters." in name:
                continue
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter_names(model: Transformer) -> set[str]:
    """Names of the LoRA adapters attached anywhere in the model."""
    names: set[str] = set()
    for m in model.modules():
        if isinstance(m, AdaptableLinear):
            names.update(m.adapters.keys())
    return names
