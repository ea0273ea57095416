"""Frozen, validated configuration for the model.

`ModelConfig` describes a Ministral3-family decoder (Llama and Mistral are special cases) plus the few
fields a tri-mode model adds: the `[MASK]` id and how diffusion logits are read (`dlm_type`).
It round-trips through JSON (`to_dict` / `from_dict`) and can be built from a Hugging Face
`config.json` of the supported families (`from_hf_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DLM_TYPES = ("llada", "dream")

# Hugging Face `model_type` values we can import, and what they mean for defaults.
HF_MODEL_TYPES = ("nemotron_labs_diffusion", "ministral3", "mistral", "llama", "trimode")


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling (Peng et al. 2023, arXiv 2309.00071), with the fields NLD ships."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        for name in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            v = getattr(self, name)
            if v is not None and not _is_real(v):
                raise ValueError(f"yarn {name} must be a finite number, got {v!r}")
        if not isinstance(self.original_max_position_embeddings, int) or isinstance(
                self.original_max_position_embeddings, bool):
            raise ValueError(f"yarn original_max_position_embeddings must be an integer, got "
                             f"{self.original_max_position_embeddings!r}")
        if not self.factor > 0:
            raise ValueError(f"yarn factor must be > 0, got {self.factor}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(
                "yarn original_max_position_embeddings must be >= 1, got "
                f"{self.original_max_position_embeddings}"
            )

    def resolved_attention_factor(self) -> float:
        """The cos/sin multiplier. NLD has mscale == mscale_all_dim, which gives exactly 1.0."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    yarn: YarnScaling | None = None
    # Llama-4 query temperature: q *= 1 + beta * ln(1 + floor(pos / llama4_original_max)), after RoPE.
    llama4_scaling_beta: float | None = None
    llama4_original_max: int | None = None
    tie_word_embeddings: bool = False
    # Tri-mode fields.
    mask_token_id: int | None = None
    dlm_type: str = "llada"
    block_len: int = 32
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "max_seq_len", "block_len",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dlm_type not in DLM_TYPES:
            raise ValueError(f"dlm_type must be one of {DLM_TYPES}, got {self.dlm_type!r}")
        # Numbers that load fine but make every output wrong (a NaN epsilon, an infinite base...) are
        # refused here, with the field named, rather than discovered as empty or garbage text.
        for name, lo, hi in (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 0.0, 1e12)):
            v = getattr(self, name)
            if not _is_real(v) or not lo < v <= hi:
                raise ValueError(f"ModelConfig.{name} must be a finite number in ({lo:g}, {hi:g}], got {v!r}")
        if self.llama4_scaling_beta is not None and (not _is_real(self.llama4_scaling_beta)
                                                     or not 0 <= self.llama4_scaling_beta <= 10):
            raise ValueError(f"ModelConfig.llama4_scaling_beta must be a finite number in [0, 10], got "
                             f"{self.llama4_scaling_beta!r}")
        for name in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "llama4_original_max"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"ModelConfig.{name} must be an integer or null, got {v!r}")
        for name in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                raise ValueError(f"{name}={v} is outside the vocabulary [0, {self.vocab_size})")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.llama4_scaling_beta is not None and not self.llama4_original_max:
            raise ValueError("llama4_scaling_beta needs llama4_original_max (a positive integer)")
        # Shapes that no checkpoint here could hold: refuse before anything is allocated.
        limits = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_layers": 1024,
                  "num_heads": 1024, "head_dim": 4096, "max_seq_len": 1 << 24, "block_len": 4096}
        for name, cap in limits.items():
            if getattr(self, name) > cap:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)} is beyond any supported model "
                                 f"(at most {cap})")

    # -- derived -------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        per_layer = (
            self.hidden_size * (self.q_dim + 2 * self.kv_dim)
            + self.q_dim * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size
            + 2 * self.hidden_size
        )
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "trimode"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d.pop("model_type", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        if d.get("yarn") is not None:
            d["yarn"] = YarnScaling(**d["yarn"])
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face `config.json` (NLD, Ministral3, Mistral, Llama) onto ModelConfig."""
        model_type = d.get("model_type")
        if model_type == "trimode":
            return cls.from_dict(d)
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {model_type!r}; supported: {', '.join(HF_MODEL_TYPES)}"
            )
        if "text_config" in d and "hidden_size" not in d:
            d = {**d["text_config"], "model_type": d["text_config"].get("model_type", model_type)}
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            cfg: dict[str, Any] = dict(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None
        for k in ("attention_bias", "mlp_bias"):
            if d.get(k):
                raise ValueError(f"{k}=true is not supported (this architecture has no biases)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
        max_pos = int(d.get("max_position_embeddings", 4096))
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        if window:
            # Inside the window, sliding attention equals full attention, so capping the context at
            # the window keeps the model exact instead of silently wrong past it.
            max_pos = min(max_pos, int(window))
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        yarn = None
        if rope_type == "yarn":
            orig = rope.get("original_max_position_embeddings")
            if orig is None:
                raise ValueError("yarn rope scaling lacks original_max_position_embeddings")
            factor = rope.get("factor")
            if factor is None:
                factor = float(d["max_position_embeddings"]) / float(orig)
            yarn = YarnScaling(
                factor=float(factor),
                original_max_position_embeddings=int(orig),
                beta_fast=float(rope.get("beta_fast") or 32.0),
                beta_slow=float(rope.get("beta_slow") or 1.0),
                mscale=rope.get("mscale"),
                mscale_all_dim=rope.get("mscale_all_dim"),
                attention_factor=rope.get("attention_factor"),
                truncate=bool(rope.get("truncate", True)),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"rope type {rope_type!r} is not supported (default or yarn)")
        beta = rope.get("llama_4_scaling_beta", d.get("llama_4_scaling_beta"))
        if beta is not None:
            cfg["llama4_scaling_beta"] = float(beta)
            cfg["llama4_original_max"] = int(
                rope.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
                or d["max_position_embeddings"]
            )
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        mask_id = d.get("mask_token_id")
        if mask_id is None and model_type == "nemotron_labs_diffusion" and "mask_token_id" not in d:
            mask_id = 100
        cfg.update(
            max_seq_len=max_pos,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            yarn=yarn,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            mask_token_id=mask_id,
            dlm_type=d.get("dlm_type", "llada"),
            block_len=int(d.get("block_size", 32) or 32),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
        )
        return cls(**cfg)

    def to_hf_dict(self, *, model_type: str = "nemotron_labs_diffusion") -> dict[str, Any]:
        """The NLD-style `config.json` written by `export_nld`."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.yarn is not None:
            y = self.yarn
            rope.update(
                rope_type="yarn", factor=y.factor,
                original_max_position_embeddings=y.original_max_position_embeddings,
                beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
                mscale_all_dim=y.mscale_all_dim, truncate=y.truncate,
            )
            if y.attention_factor is not None:
                rope["attention_factor"] = y.attention_factor
        if self.llama4_scaling_beta is not None:
            rope["llama_4_scaling_beta"] = self.llama4_scaling_beta
            rope.setdefault("original_max_position_embeddings", self.llama4_original_max)
        return {
            "architectures": ["NemotronLabsDiffusionModel"],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "sliding_window": None,
            "mask_token_id": self.mask_token_id,
            "dlm_type": self.dlm_type,
            "block_size": self.block_len,
            "dlm_paradigm": "bidirectional",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
