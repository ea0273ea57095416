"""Peers on the same weights, in the same process: `transformers` greedy `generate` and its
prompt-lookup assisted decoding (`prompt_lookup_num_tokens`), at batch 1.

The Hugging Face model is built in memory from our config and state dict (our parameter names are
HF's without the `model.` prefix; adapters are left out: peers decode with base weights, as our
verifier does). Llama covers plain RoPE; YaRN or llama-4 query scaling needs Ministral3. Before any
timing, logits of both models on one sequence are compared (`max_abs_diff`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from .suites import Prompt
from .timing import synchronize


def hf_config(c: ModelConfig):
    import transformers

    common = dict(  # noqa: C408 (mirrors the HF config call)
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    if c.yarn is None and c.llama4_scaling_beta is None:
        rope = {"rope_type": "default", "rope_theta": c.rope_theta}
        return transformers.LlamaConfig(**common, rope_parameters=rope, attention_bias=False, mlp_bias=False), \
            transformers.LlamaForCausalLM
    rope = c.to_hf_dict()["rope_parameters"]
    return transformers.Ministral3Config(**common, rope_parameters=rope, sliding_window=None), \
        transformers.Ministral3ForCausalLM


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers CausalLM holding the same weights (shared storage: no copy) in the same dtype."""
    cfg, cls = hf_config(model.config)
    with torch.device("meta"):
        hf = cls(cfg)
    state = {}
    for k, v in model.state_dict().items():
        if ".adapters." in k or k == "inv_freq":
            continue
        state[k if k == "lm_head.weight" else f"model.{k}"] = v
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ValueError(f"weights do not map onto {cls.__name__}: missing {missing}, unexpected {unexpected}")
    # Non-persistent buffers (rotary inv_freq) were born on meta: rebuild them on the real device.
    dev = model.device
    for mod in hf.modules():
        if isinstance(getattr(mod, "inv_freq", None), torch.Tensor) and mod.inv_freq.is_meta:
            with torch.device("cpu"):
                fresh = type(mod)(cfg)
            for b, t in fresh.named_buffers(recurse=False):
                setattr(mod, b, t.to(dev))
    assert not any(t.is_meta for t in [*hf.parameters(), *hf.buffers()]), "HF model has tensors left on meta"
    return hf.to(dev).eval()


def logits_diff(model: torch.nn.Module, hf: torch.nn.Module, tokens: Sequence[int]) -> float:
    x = torch.tensor([list(tokens)], device=model.device)
    with torch.inference_mode():
        ours = model(x).float()
        theirs = hf(x).logits.float()
    return float((ours - theirs).abs().max())


@dataclass
class PeerResult:
    name: str
    tokens: int
    seconds: float
    outputs: dict[str, list[int]]
    per_prompt: dict[str, float] = field(default_factory=dict)  # seconds per prompt source
    forwards: int = 0  # model forwards, counted by a hook (prefill included)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def merge(self, other: PeerResult) -> None:
        """Add another batch's run of the same peer."""
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.forwards += other.forwards
        self.outputs.update(other.outputs)
        self.per_prompt.update(other.per_prompt)


def _strip(ids: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def hf_generate(hf: torch.nn.Module, prompts: Sequence[Prompt], *, max_new_tokens: int, eos_id: int | None,
                lookup: int | None = None, name: str = "hf") -> PeerResult:
    """Greedy `generate` (or prompt lookup with `lookup` tokens) one prompt at a time."""
    dev = next(hf.parameters()).device
    kw: dict = {"do_sample": False, "max_new_tokens": max_new_tokens, "num_beams": 1,
                "eos_token_id": eos_id, "pad_token_id": eos_id if eos_id is not None else 0,
                "temperature": None, "top_p": None, "top_k": None}
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    outs: dict[str, list[int]] = {}
    per: dict[str, float] = {}
    stop = {eos_id} if eos_id is not None else set()
    count = [0]
    hook = hf.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        for p in prompts:
            _one(hf, p, kw, dev, stop, outs, per)
    finally:
        hook.remove()
    total = sum(len(outs[p.source]) for p in prompts)
    return PeerResult(name, total, sum(per.values()), outs, per, count[0])


def _one(hf, p: Prompt, kw: dict, dev, stop: set[int], outs: dict, per: dict) -> None:
    x = torch.tensor([list(p.tokens)], device=dev)
    synchronize(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = hf.generate(x, attention_mask=torch.ones_like(x), **kw)
    synchronize(dev)
    per[p.source] = time.perf_counter() - t0
    outs[p.source] = _strip(y[0, x.shape[1]:].tolist(), stop)


def fastest_peer(results: Sequence[PeerResult]) -> PeerResult:
    """Merge repeats prompt by prompt, keeping each prompt's fastest run (as `runner.fastest`)."""
    first = results[0]
    per = {s: min(r.per_prompt[s] for r in results) for s in first.per_prompt}
    return PeerResult(first.name, first.tokens, sum(per.values()), first.outputs, per, first.forwards)
