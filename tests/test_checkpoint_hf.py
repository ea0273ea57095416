"""Our logits == transformers' on the same random tiny weights, loaded through `load_model`.

Covers Ministral3 (YaRN + llama-4 query scaling past original_max_position_embeddings), Mistral,
Llama (plain, YaRN with a non-unit attention factor, tied embeddings), head_dim != hidden / heads,
sharded checkpoints and the VLM key layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trimode.checkpoint import export_nld, load_model

transformers = pytest.importorskip("transformers")

TINY = dict(  # noqa: C408 (reads as the HF config call it feeds)
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, max_position_embeddings=1024, rms_norm_eps=1e-5,
)
ORIG_MAX = 64  # small original context, so a 200-token sequence crosses the YaRN / llama-4 thresholds
SEQ = 200


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model: torch.nn.Module) -> None:
    """Larger-than-default weights so that rotary or scaling mistakes move logits far above tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.15)


def _hf_model(kind: str, **overrides: object) -> torch.nn.Module:
    kw = {**TINY, **overrides}
    if kind == "ministral3":
        kw.setdefault("rope_parameters", {
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": ORIG_MAX,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        })
        cfg, cls = transformers.Ministral3Config(**kw), transformers.Ministral3ForCausalLM
    elif kind == "mistral":
        kw.setdefault("sliding_window", None)  # else our config caps max_seq_len at the window
        cfg, cls = transformers.MistralConfig(**kw), transformers.MistralForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    _randomise(model)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _compare(hf: torch.nn.Module, path: Path, *, tol: float = 1e-4) -> torch.nn.Module:
    ours = load_model(path)
    tokens = torch.randint(0, TINY["vocab_size"], (2, SEQ))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    assert want.abs().max() > 1.0, "weights too small for a meaningful comparison"
    assert (got - want).abs().max().item() <= tol
    return ours


CASES = {
    "ministral3_yarn_llama4": ("ministral3", {}),
    "mistral": ("mistral", {}),
    "llama": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama_yarn": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIG_MAX}}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_default_head_dim": ("llama", {"head_dim": None}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    kind, overrides = CASES[case]
    hf = _hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path)
    ours = _compare(hf, tmp_path)
    c = ours.config
    if case == "ministral3_yarn_llama4":
        assert c.yarn is not None and c.llama4_scaling_beta == 0.1 and c.llama4_original_max == ORIG_MAX
    # The NLD export of any of these keeps the rotary settings: it still matches transformers.
    export_nld(ours, tmp_path / "nld")
    assert load_model(tmp_path / "nld").config == c.replace(tie_word_embeddings=False)
    _compare(hf, tmp_path / "nld")
    if case == "llama_tied":
        assert c.tie_word_embeddings and ours.lm_head is None
        assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    if case == "llama_default_head_dim":
        assert c.head_dim == 16
    else:
        assert c.head_dim == 24


def test_scaling_is_exercised(tmp_path: Path) -> None:
    """Guard against a vacuous comparison: dropping llama-4 scaling must break the match."""
    torch.manual_seed(0)
    hf = _hf_model("ministral3")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    from trimode.model import Transformer

    plain = Transformer(ours.config.replace(llama4_scaling_beta=None, llama4_original_max=None))
    plain.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 128, (1, SEQ))
    with torch.no_grad():
        assert (plain(tokens) - hf(tokens).logits).abs().max() > 1e-2


def test_sharded(tmp_path: Path) -> None:
    torch.manual_seed(1)
    hf = _hf_model("ministral3")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    _compare(hf, tmp_path)


def test_sharded_missing_shard(tmp_path: Path) -> None:
    torch.manual_seed(1)
    _hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        load_model(tmp_path)


@pytest.mark.parametrize("body, head", [
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
])
def test_vlm_layouts(body: str, head: str, tmp_path: Path) -> None:
    """The text tower of a VLM checkpoint: prefixed keys, a nested text_config, a vision tower to skip."""
    torch.manual_seed(2)
    hf = _hf_model("ministral3")
    hf.save_pretrained(tmp_path / "src")
    sd = load_file(tmp_path / "src" / "model.safetensors")
    out = {(head if k == "lm_head.weight" else body + k.removeprefix("model.")): v for k, v in sd.items()}
    out["vision_tower.patch_conv.weight"] = torch.zeros(4, 3)
    out["multi_modal_projector.linear_1.weight"] = torch.zeros(4, 4)
    dst = tmp_path / "vlm"
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    text = json.loads((tmp_path / "src" / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": text}))
    _compare(hf, dst)
