"""Checkpoint layouts, round trips, PEFT adapters, atomic saves and every validation error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trimode.checkpoint import export_nld, load_adapter, load_model, save_adapter, save_model
from trimode.config import ModelConfig
from trimode.model import Transformer, init_weights

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=24, max_seq_len=256, mask_token_id=100, bos_token_id=1, eos_token_id=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(config: ModelConfig = CFG, *, seed: int = 0, std: float = 0.2) -> Transformer:
    return init_weights(Transformer(config), seed=seed, std=std).eval()


def _draft(model: Transformer, *, r: int = 4, alpha: float = 16.0, targets: tuple[str, ...] = ("o_proj",)) -> None:
    """A 'draft' adapter with a non-zero B, so it visibly changes the logits."""
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            lora = m.add_adapter("draft", r, alpha)
            with torch.no_grad():
                lora.B.normal_(0, 0.2)


def _logits(model: Transformer, adapter: str | None = None) -> torch.Tensor:
    tokens = torch.arange(40).remainder(model.config.vocab_size).view(2, 20)
    with torch.no_grad():
        return model(tokens, adapter=adapter)


def _nld_dir(path: Path, model: Transformer, *, lora: dict[str, torch.Tensor] | None = None,
             lora_cfg: dict | None = None) -> Path:
    """An NLD Hugging Face directory written by hand, as the public checkpoint lays it out."""
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    (path / "config.json").write_text(json.dumps({
        "architectures": ["NemotronLabsDiffusionModel"], "model_type": "nemotron_labs_diffusion",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "sliding_window": None,
        "tie_word_embeddings": False, "mask_token_id": 100, "block_size": 32, "dlm_paradigm": "bidirectional",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }))
    sd = {("diffusion_head.weight" if k == "lm_head.weight" else "encoder." + k): v
          for k, v in model.state_dict().items() if ".adapters." not in k}
    save_file(sd, path / "model.safetensors")
    if lora is not None:
        (path / "linear_spec_lora").mkdir()
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["o_proj"], "inference_mode": True}
        (path / "linear_spec_lora" / "adapter_config.json").write_text(json.dumps({**cfg, **(lora_cfg or {})}))
        save_file(lora, path / "linear_spec_lora" / "adapter_model.safetensors")
    return path


def _random_lora(config: ModelConfig, key_fmt: str, *, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for i in range(config.num_layers):
        out[key_fmt.format(i=i, ab="A")] = torch.randn(r, config.q_dim, generator=g) * 0.2
        out[key_fmt.format(i=i, ab="B")] = torch.randn(config.hidden_size, r, generator=g) * 0.2
    return out


NLD_KEY = "base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_{ab}.weight"


# -- NLD layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("key_fmt", [
    NLD_KEY,
    "base_model.model.model.layers.{i}.self_attn.o_proj.lora_{ab}.weight",
    "encoder.layers.{i}.self_attn.o_proj.lora_{ab}.weight",
    "base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_{ab}.default.weight",
    "layers.{i}.self_attn.o_proj.lora_{ab}.weight",
])
def test_nld_dir_with_adapter_matches_merged_weights(key_fmt: str, tmp_path: Path) -> None:
    ref = _model()
    lora = _random_lora(CFG, key_fmt)
    model = load_model(_nld_dir(tmp_path, ref, lora=lora))
    assert model.config.mask_token_id == 100 and not model.config.tie_word_embeddings
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)
    # Adapter on == the base model with scale * B @ A merged into each o_proj (scale = 16 / 4).
    merged = _model()
    with torch.no_grad():
        for i, layer in enumerate(merged.layers):
            a, b = lora[key_fmt.format(i=i, ab="A")], lora[key_fmt.format(i=i, ab="B")]
            layer.self_attn.o_proj.weight += 4.0 * b @ a
    torch.testing.assert_close(_logits(model, "draft"), _logits(merged), rtol=1e-5, atol=1e-5)
    assert (_logits(model, "draft") - _logits(model)).abs().max() > 1e-2


def test_nld_rslora_and_alpha_pattern(tmp_path: Path) -> None:
    ref = _model()
    lora = _random_lora(CFG, NLD_KEY)
    cfg = {"use_rslora": True, "alpha_pattern": {"layers.1.self_attn.o_proj": 8}}
    model = load_model(_nld_dir(tmp_path, ref, lora=lora, lora_cfg=cfg))
    scales = [layer.self_attn.o_proj.adapters["draft"].scale for layer in model.layers]
    assert scales == pytest.approx([16 / 2, 8 / 2])  # rsLoRA: alpha / sqrt(r), r = 4


def test_nld_tied_config_with_head_is_untied(tmp_path: Path) -> None:
    """NLD 3B inherits tie_word_embeddings=true from its base but ships a separate diffusion_head."""
    ref = _model()
    path = _nld_dir(tmp_path, ref)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    model = load_model(path)
    assert model.lm_head is not None
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("with_adapter", [False, True])
def test_native_round_trip(with_adapter: bool, tmp_path: Path) -> None:
    model = _model()
    if with_adapter:
        _draft(model)
        _draft_b = model.layers[0].mlp.up_proj.add_adapter("other", 2, 3.0)
        with torch.no_grad():
            _draft_b.B.normal_()
    save_model(model, tmp_path / "ckpt")
    assert "adapters" not in " ".join(load_file(tmp_path / "ckpt" / "model.safetensors"))
    back = load_model(tmp_path / "ckpt")
    assert back.config == model.config
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=0)
    if with_adapter:
        for name in ("draft", "other"):
            torch.testing.assert_close(_logits(back, name), _logits(model, name), rtol=0, atol=0)
        acfg = json.loads((tmp_path / "ckpt" / "adapters" / "other" / "adapter_config.json").read_text())
        assert acfg["target_modules"] == ["layers.0.mlp.up_proj"] and acfg["r"] == 2 and acfg["lora_alpha"] == 3


@pytest.mark.parametrize("tied", [False, True])
def test_export_nld_round_trip(tied: bool, tmp_path: Path) -> None:
    model = _model(CFG.replace(tie_word_embeddings=tied, mask_token_id=None))
    _draft(model)
    export_nld(model, tmp_path / "nld")
    sd = load_file(tmp_path / "nld" / "model.safetensors")
    assert "diffusion_head.weight" in sd and all(k.startswith("encoder.") for k in sd if k != "diffusion_head.weight")
    keys = load_file(tmp_path / "nld" / "linear_spec_lora" / "adapter_model.safetensors")
    assert "base_model.model.encoder.layers.1.self_attn.o_proj.lora_A.weight" in keys
    acfg = json.loads((tmp_path / "nld" / "linear_spec_lora" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["target_modules"] == ["o_proj"] and acfg["inference_mode"]
    assert json.loads((tmp_path / "nld" / "config.json").read_text())["model_type"] == "nemotron_labs_diffusion"
    back = load_model(tmp_path / "nld")
    assert back.lm_head is not None and back.config.mask_token_id is None
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=0)
    torch.testing.assert_close(_logits(back, "draft"), _logits(model, "draft"), rtol=0, atol=0)


def test_adapter_round_trip_and_peft_layout(tmp_path: Path) -> None:
    model = _model()
    _draft(model, r=3, alpha=6.0, targets=("q_proj", "o_proj", "lm_head"))
    save_adapter(model, "draft", tmp_path / "ad")
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert sd["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 64)  # (r, in)
    assert sd["base_model.model.lm_head.lora_B.weight"].shape == (128, 3)  # (out, r)
    fresh = _model()
    load_adapter(fresh, tmp_path / "ad", name="spec")
    torch.testing.assert_close(_logits(fresh, "spec"), _logits(model, "draft"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        save_adapter(model, "nope", tmp_path / "ad2")


def test_dtype_handling(tmp_path: Path) -> None:
    model = _model()
    save_model(model.to(torch.bfloat16), tmp_path / "bf16")
    assert load_model(tmp_path / "bf16").dtype == torch.bfloat16
    assert load_model(tmp_path / "bf16", dtype="float32").dtype == torch.float32
    save_model(model.to(torch.float16), tmp_path / "fp16")
    assert load_model(tmp_path / "fp16").dtype == torch.float32  # fp16 on CPU is promoted
    assert load_model(tmp_path / "fp16", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model(tmp_path / "fp16", dtype="int8")


# -- atomic saves -------------------------------------------------------------------------------
def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _model(seed=1)
    save_model(old, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("trimode.checkpoint.save_tensors", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(seed=2), tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left behind
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(seed=2), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_save_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_model(_model(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_save_copies_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from trimode.tokenizer import Tokenizer, load_tokenizer

    words = ["<unk>", "<s>", "</s>", "<|mask|>", "hello", "world"] + [f"w{i}" for i in range(90)]  # 96 of 128
    vocab = {w: i for i, w in enumerate(words)}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, special_tokens={"bos": "<s>", "eos": "</s>"}, chat_template="{{ messages[0].content }}")
    model = _model(CFG.replace(mask_token_id=3))
    with pytest.raises(ValueError, match="mask_token_id=100 is not a token"):
        save_model(_model(), tmp_path / "a", tokenizer=tok)  # checked before anything is written
    assert not (tmp_path / "a").exists()
    save_model(model, tmp_path / "a", tokenizer=tok)
    back = load_tokenizer(tmp_path / "a")
    assert back is not None and back.encode("hello world") == [4, 5] and (back.eos_id, back.mask_id) == (2, 3)
    export_nld(model, tmp_path / "b", tokenizer=back)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert load_model(tmp_path / "b").config.eos_token_id == 2


# -- validation -----------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    save_model(_model(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_weights(path: Path, edit) -> None:
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


def test_truncated_file(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupted"):
        load_model(ckpt)


def test_garbage_header(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\xff" * 64 + data[64:])
    with pytest.raises(ValueError, match=str(f)):
        load_model(ckpt)


def test_missing_tensor(ckpt: Path) -> None:
    _edit_weights(ckpt, lambda sd: sd.pop("layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: layers\.1\.mlp\.down_proj\.weight"):
        load_model(ckpt)


def test_missing_head_hints_at_tying(ckpt: Path) -> None:
    _edit_weights(ckpt, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings=false"):
        load_model(ckpt)


def test_extra_tensor(ckpt: Path) -> None:
    def edit(sd: dict) -> None:
        sd["layers.0.self_attn.bias"] = torch.zeros(3)
        sd["layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(12)  # harmless, ignored

    _edit_weights(ckpt, edit)
    with pytest.raises(ValueError, match=r"unexpected tensors.*layers\.0\.self_attn\.bias") as e:
        load_model(ckpt)
    assert "inv_freq" not in str(e.value)


def test_wrong_shape(ckpt: Path) -> None:
    _edit_weights(ckpt, lambda sd: sd.update({"layers.0.self_attn.k_proj.weight": torch.zeros(24, 64)}))
    with pytest.raises(ValueError, match=r"'layers\.0\.self_attn\.k_proj\.weight' has shape \(24, 64\), "
                                         r"expected \(48, 64\)"):
        load_model(ckpt)


def test_non_finite_weight(ckpt: Path) -> None:
    def edit(sd: dict) -> None:
        sd["norm.weight"][3] = float("nan")

    _edit_weights(ckpt, edit)
    with pytest.raises(ValueError, match="'norm.weight' holds NaN or inf"):
        load_model(ckpt)
    assert torch.isnan(load_model(ckpt, check_finite=False).norm.weight).any()


def test_config_errors(ckpt: Path, tmp_path: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="is not a directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(tmp_path / "empty")


def test_tied_config_with_stored_head(tmp_path: Path) -> None:
    save_model(_model(), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="differs from the embedding"):
        load_model(tmp_path / "c")
    # Some exporters store the tied head anyway: harmless when it is the embedding.
    _edit_weights(tmp_path / "c", lambda sd: sd.update({"lm_head.weight": sd["embed_tokens.weight"].clone()}))
    model = load_model(tmp_path / "c")
    assert model.lm_head is None
    tied = _model(CFG.replace(tie_word_embeddings=True))  # same seed: same weights, head = embedding
    torch.testing.assert_close(_logits(model), _logits(tied), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_load_to_gpu(tmp_path: Path) -> None:
    model = _model()
    _draft(model)
    save_model(model, tmp_path / "c")
    gpu = load_model(tmp_path / "c", device="cuda", dtype=torch.bfloat16)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16 and gpu.inv_freq.device.type == "cuda"
    assert gpu.layers[0].self_attn.o_proj.adapters["draft"].A.device.type == "cuda"
    for adapter in (None, "draft"):
        torch.testing.assert_close(_logits(gpu, adapter).float().cpu(), _logits(model, adapter), rtol=0.05, atol=0.1)


def test_bad_adapters(tmp_path: Path) -> None:
    ref = _model()
    lora = _random_lora(CFG, NLD_KEY)
    with pytest.raises(ValueError, match="target module 'qkv_proj' does not exist"):
        load_model(_nld_dir(tmp_path / "a", ref, lora=lora, lora_cfg={"target_modules": ["qkv_proj"]}))
    bad = {k.replace("o_proj", "out_proj"): v for k, v in lora.items()}
    with pytest.raises(ValueError, match=r"targets module '.*encoder\.layers\.0\.self_attn\.out_proj', which does not"):
        load_model(_nld_dir(tmp_path / "b", ref, lora=bad, lora_cfg={"target_modules": ["o_proj"]}))
    wrong = dict(lora)
    wrong[NLD_KEY.format(i=1, ab="B")] = torch.zeros(32, 4)
    with pytest.raises(ValueError, match=r"lora_B\.weight has shape \(32, 4\), expected \(64, 4\)"):
        load_model(_nld_dir(tmp_path / "c", ref, lora=wrong))
    half = {k: v for k, v in lora.items() if "lora_B" not in k or ".0." not in k}
    with pytest.raises(ValueError, match="has lora_A but no lora_B"):
        load_model(_nld_dir(tmp_path / "d", ref, lora=half))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_model(_nld_dir(tmp_path / "e", ref, lora=lora, lora_cfg={"use_dora": True}))
    fresh = _model()
    with pytest.raises(ValueError, match="adapter name must be a plain identifier"):
        load_adapter(fresh, tmp_path / "a" / "linear_spec_lora", name="../x")
    assert not any(m.adapters for m in fresh.modules() if hasattr(m, "adapters"))
