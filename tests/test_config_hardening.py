"""A config.json that would load into a silently wrong model (or a traceback, or an allocation of
gigabytes) is a ValueError naming the field, before any tensor is allocated."""

from __future__ import annotations

import json
import time

import pytest
import torch

from trimode.checkpoint import load_model, save_model
from trimode.config import ModelConfig
from trimode.model import Transformer, init_weights

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, max_seq_len=64, mask_token_id=95)


@pytest.mark.parametrize("field,value,match", [
    ("rms_norm_eps", -1.0, "rms_norm_eps"), ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps"), ("rms_norm_eps", "x", "rms_norm_eps"),
    ("rope_theta", float("inf"), "rope_theta"), ("rope_theta", 0.0, "rope_theta"),
    ("llama4_scaling_beta", float("nan"), "llama4_scaling_beta"),
    ("mask_token_id", True, "mask_token_id must be an integer"), ("mask_token_id", 2.5, "mask_token_id"),
    ("num_layers", 100000, "num_layers = 100000 is beyond"), ("block_len", 10**9, "block_len"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings"),
])
def test_bad_fields_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, field: value, **({"llama4_original_max": 8} if field.startswith("llama4") else {})})


@pytest.mark.parametrize("edit", [
    {"num_layers": 10**6}, {"rms_norm_eps": float("nan")}, {"mask_token_id": True}, {"rope_theta": 1e400},
])
def test_a_checkpoint_with_a_bad_config_fails_fast(tmp_path, edit):
    d = tmp_path / "m"
    save_model(init_weights(Transformer(ModelConfig(**BASE)), seed=0), d)
    raw = json.loads((d / "config.json").read_text())
    text = json.dumps({**raw, **edit}).replace("Infinity", "1e400")
    (d / "config.json").write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ValueError):
        load_model(d)
    assert time.perf_counter() - t0 < 5  # no allocation of the (huge) model first


def test_a_deeply_nested_config_is_a_clear_error(tmp_path):
    d = tmp_path / "m"
    save_model(init_weights(Transformer(ModelConfig(**BASE)), seed=0), d)
    (d / "config.json").write_text('{"a": ' * 100000 + "1" + "}" * 100000)
    with pytest.raises(ValueError, match="nested too deeply|cannot read"):
        load_model(d)


def test_integer_tensors_and_foreign_shards_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    save_model(init_weights(Transformer(ModelConfig(**BASE)), seed=0), d)
    state = load_file(str(d / "model.safetensors"))
    name = "layers.0.mlp.up_proj.weight"
    relabelled = {**state, name: (state[name] * 1000).to(torch.int16)}  # same shape, the header says I16
    save_file(relabelled, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{name}' is stored as I16; weights must be floating point"):
        load_model(d)
    save_file(state, str(d / "model.safetensors"))
    load_model(d)

    # A sharded index may only name files inside the checkpoint, by name.
    (d / "model.safetensors").rename(d / "shard-1.safetensors")
    outside = tmp_path / "elsewhere.safetensors"
    save_file(state, str(outside))
    for weight_map, match in (({k: "../elsewhere.safetensors" for k in state}, "outside the checkpoint"),
                              ({k: str(outside) for k in state}, "outside the checkpoint"),
                              ({k: 1 for k in state}, "must map names to file names")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match=match):
            load_model(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "shard-1.safetensors"
                                                                              for k in state}}))
    load_model(d)
