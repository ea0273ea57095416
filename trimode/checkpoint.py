"""Load, save and export checkpoints.

`load_model` reads four directory layouts, told apart by `config.json`'s `model_type` and by where
the embedding lives:

- native (`model_type: trimode`): our parameter names in `model.safetensors`; adapters in PEFT format
  under `adapters/<name>/`;
- NLD (`nemotron_labs_diffusion`): `encoder.*` + `diffusion_head.weight`; the drafting LoRA in
  `linear_spec_lora/` becomes the adapter "draft";
- Hugging Face Ministral3 / Mistral / Llama: `model.*` + `lm_head.weight`, or the VLM text tower
  `language_model.model.*` / `model.language_model.*`;
- any of these sharded (`model.safetensors.index.json`).

Everything is checked against the headers before a byte of weight data is read (names, shapes), and
every problem is a ValueError naming the tensor and file. `save_model` writes the native layout and
`export_nld` the NLD one, both atomically (see `_io.atomic_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import peft
from ._io import TensorEntry, atomic_dir, load_tensors, read_header, read_json, save_tensors, write_json
from .config import HF_MODEL_TYPES, ModelConfig
from .dtypes import DTYPES
from .model import Transformer, rope_inv_freq
from .peft import load_adapter, save_adapter
from .tokenizer import Tokenizer

__all__ = ["export_nld", "load_adapter", "load_model", "save_adapter", "save_model"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
NLD_ADAPTER_DIR = "linear_spec_lora"
NLD_ADAPTER_NAME = "draft"
ADAPTERS_DIR = "adapters"
# Where the decoder body may sit, by layout; the embedding's key tells which one a checkpoint uses.
BODY_PREFIXES = ("", "model.", "encoder.", "language_model.model.", "model.language_model.")
HEAD_KEYS = ("lm_head.weight", "diffusion_head.weight", "language_model.lm_head.weight")
# The output head each layout stores (by the body's prefix): what a missing head is reported as.
HEAD_OF_BODY = {"encoder.": "diffusion_head.weight", "language_model.model.": "language_model.lm_head.weight"}
# Stored tensors that carry no information we need: old HF rotary caches, and the vision tower of a
# VLM checkpoint whose text decoder we load.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


# -- config and weight discovery ----------------------------------------------------------------
def read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig of checkpoint directory `path`, and the raw (text-tower) config dict."""
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"no config.json in {path}: not a checkpoint directory")
    raw = read_json(cfg_file)
    if raw.get("model_type") not in HF_MODEL_TYPES and isinstance(raw.get("text_config"), dict):
        # A VLM (e.g. Mistral3): the decoder's config is nested; top-level fields fill its gaps.
        text = dict(raw["text_config"])
        for k in ("torch_dtype", "dtype"):
            if k not in text and k in raw:
                text[k] = raw[k]
        if "tie_word_embeddings" in raw:  # the composite model ties (or not) its head, as transformers does
            text["tie_word_embeddings"] = raw["tie_word_embeddings"]
        raw = text
    try:
        return ModelConfig.from_hf_dict(raw), raw
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    except (TypeError, KeyError) as e:  # e.g. a field of the wrong JSON type
        raise ValueError(f"{cfg_file}: invalid config: {e}") from None


def weight_entries(path: Path) -> dict[str, TensorEntry]:
    """Every stored tensor's header entry, from model.safetensors or a sharded index."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path / INDEX} has no weight_map")
        root = path.resolve()
        for name, file in weight_map.items():
            if not isinstance(name, str) or not isinstance(file, str):
                raise ValueError(f"{path / INDEX}: weight_map entries must map names to file names, got "
                                 f"{name!r}: {file!r}")
            if Path(file).is_absolute() or not (path / file).resolve().is_relative_to(root):
                raise ValueError(f"{path / INDEX}: shard {file!r} lies outside the checkpoint directory")
        entries: dict[str, TensorEntry] = {}
        for file in sorted(set(weight_map.values())):
            for name, entry in read_header(path / file).items():
                if name in entries:
                    raise ValueError(f"tensor {name!r} is stored twice: in {entries[name].file} and {entry.file}")
                entries[name] = entry
        for name, file in weight_map.items():
            if name not in entries or entries[name].file.name != Path(file).name:
                raise ValueError(f"{path / INDEX} maps {name!r} to {file}, but that file does not hold it")
        return entries
    if (path / WEIGHTS).is_file():
        return read_header(path / WEIGHTS)
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".safetensors"))
    raise ValueError(f"no {WEIGHTS} or {INDEX} in {path} (found: {found or 'no weight files'})")


def map_names(
    entries: dict[str, TensorEntry], expected: dict[str, tuple[int, ...]], where: Path, *, vision: bool = False
) -> dict[str, str]:
    """Our parameter name -> stored name. Raises on missing, extra, duplicated or misshapen tensors."""
    bodies = [p for p in BODY_PREFIXES if p + "embed_tokens.weight" in entries]
    if len(bodies) != 1:
        want = " or ".join(repr(p + "embed_tokens.weight") for p in BODY_PREFIXES)
        problem = "missing tensor" if not bodies else "ambiguous layout, several of"
        raise ValueError(f"{where}: {problem} {want}")
    body = bodies[0]
    # a VLM's vision side is loaded on its own (load_vision): where config.json describes it, or in the
    # VLM text-tower layouts (whose vision tensors are skipped when the config has no vision_config)
    vision_ok = vision or body in ("language_model.model.", "model.language_model.")
    mapping: dict[str, str] = {}
    extra = []
    for stored in entries:
        ours = "lm_head.weight" if stored in HEAD_KEYS else stored[len(body):] if stored.startswith(body) else None
        if ours is not None and ours in expected:
            if ours in mapping:
                raise ValueError(f"{where}: both {mapping[ours]!r} and {stored!r} map to {ours!r}")
            mapping[ours] = stored
        elif stored.endswith(HARMLESS_SUFFIXES) or (vision_ok and stored.startswith(VISION_PREFIXES)):
            continue
        else:
            extra.append(stored)
    if extra:
        raise ValueError(f"{where}: unexpected tensors not used by the model: {', '.join(sorted(extra)[:8])}"
                         + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
    head = HEAD_OF_BODY.get(body, "lm_head.weight")
    missing = [body + n if n != "lm_head.weight" else head for n in expected if n not in mapping]
    if missing:
        hint = "" if head not in missing else (
            " (an NLD checkpoint always stores its own output head)" if body == "encoder."
            else " (config.json says tie_word_embeddings=false)")
        raise ValueError(f"{where}: missing tensors: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else "") + hint)
    for ours, stored in mapping.items():
        got = entries[stored].shape
        if got != expected[ours]:
            raise ValueError(
                f"{entries[stored].file}: tensor {stored!r} has shape {got}, expected {expected[ours]}"
            )
    return mapping


def resolve_dtype(
    dtype: torch.dtype | str | None, raw: dict[str, Any], entry: TensorEntry, *, device: torch.device
) -> torch.dtype:
    """The requested dtype, else the stored one (config, then tensor); fp16 becomes fp32 on CPU."""
    if dtype is not None:
        if isinstance(dtype, str):
            if dtype.removeprefix("torch.") not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
            return DTYPES[dtype.removeprefix("torch.")]
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        return dtype
    stored = raw.get("torch_dtype") or raw.get("dtype")
    resolved = DTYPES.get(stored.removeprefix("torch.")) if isinstance(stored, str) else None
    if resolved is None:
        resolved = _SAFETENSORS_DTYPES.get(entry.dtype, torch.float32)
    if resolved == torch.float16 and device.type == "cpu":
        return torch.float32  # fp16 matmuls on CPU are slow and overflow-prone; fp32 is exact for them
    return resolved


# -- loading ----------------------------------------------------------------------------------
def load_model(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
    check_finite: bool = True, quantize: str | None = None,
) -> Transformer:
    """Load a native, NLD, Ministral3, Mistral or Llama checkpoint directory (see module docstring).

    dtype: None keeps the stored dtype (float16 becomes float32 on CPU); otherwise weights are cast.
    check_finite: reject weights holding NaN or inf (one pass over the data as it loads).
    Adapters found in the directory are attached (native: by name; NLD: as "draft"), and so is a
    feature drafter in its `feature_drafter/` subdirectory (trimode/feature_drafter.py).
    quantize: "int8" | "int4" weight-only quantization of the base weights (trimode.quant; CPU); a
    model converted from a GGUF (CONVERTED_FROM.json) takes its int4 codes from the GGUF's Q4_1 blocks.
    """
    path = Path(path)
    device = torch.device(device)
    from .quant import check_scheme

    quantize = check_scheme(quantize, device)  # a bad scheme / device fails before anything is read
    config, raw = read_config(path)
    entries = weight_entries(path)
    native = raw.get("model_type") == "trimode"
    nld = raw.get("model_type") == "nemotron_labs_diffusion"
    if nld and config.tie_word_embeddings:
        # NLD always stores its own head (diffusion_head.weight), untied even where its base model tied it
        # (the 3B), whatever config.json inherited: a directory without it is incomplete, not tied.
        config = config.replace(tie_word_embeddings=False)
    untie_check = config.tie_word_embeddings and any(k in entries for k in HEAD_KEYS)

    with torch.device("meta"):
        model = Transformer(config.replace(tie_word_embeddings=False) if untie_check else config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = map_names(entries, expected, path, vision=isinstance(read_json(path / "config.json").get("vision_config"),
                                                                   dict))
    for stored in mapping.values():  # an integer tensor cast to float would load as silent garbage
        if entries[stored].dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{entries[stored].file}: tensor {stored!r} is stored as {entries[stored].dtype}; "
                             f"weights must be floating point ({', '.join(_SAFETENSORS_DTYPES)})")
    dt = resolve_dtype(dtype, raw, entries[mapping["embed_tokens.weight"]], device=device)

    by_file: dict[Path, list[str]] = {}
    for stored in mapping.values():
        by_file.setdefault(entries[stored].file, []).append(stored)
    ours_of = {stored: ours for ours, stored in mapping.items()}
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        for stored, t in load_tensors(file, names):
            t = t.to(device=device, dtype=dt)
            if check_finite and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{file}: tensor {stored!r} holds NaN or inf values")
            state[ours_of[stored]] = t

    if untie_check:
        # Tied in config.json but a head was stored too: harmless only if it is the embedding.
        head = state.pop("lm_head.weight")
        if not torch.equal(head, state["embed_tokens.weight"]):
            raise ValueError(
                f"{path}: config.json says tie_word_embeddings=true but the stored head "
                f"{mapping['lm_head.weight']!r} differs from the embedding"
            )
        with torch.device("meta"):
            model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers were born on the meta device; rebuild them for real.
    inv_freq, _ = rope_inv_freq(config)
    model.inv_freq = inv_freq.to(device)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "tensor left on meta"

    tower = load_vision(path, config, entries, dtype=dt, device=device, check_finite=check_finite)
    if tower is not None:
        model.set_vision(tower)
    if native and (path / ADAPTERS_DIR).is_dir():
        for sub in sorted(p for p in (path / ADAPTERS_DIR).iterdir() if p.is_dir()):
            load_adapter(model, sub, name=sub.name)
    if not native and (path / NLD_ADAPTER_DIR).is_dir():
        load_adapter(model, path / NLD_ADAPTER_DIR, name=NLD_ADAPTER_NAME)
    from .feature_drafter import DRAFTER_DIR, has_feature_drafter, load_feature_drafter

    if has_feature_drafter(path / DRAFTER_DIR):  # an EAGLE-style drafter for linear mode (trimode/feature_drafter.py)
        model.set_feature_drafter(load_feature_drafter(path / DRAFTER_DIR, model.config, dtype=dt, device=device))
    from .models import read_decoding

    model.decoding = read_decoding(path)  # measured decoding defaults (best block length per mode)
    if quantize is not None:
        from .quant import quantize_model

        quantize_model(model, quantize, gguf=_converted_from(path))
    return model.eval()


# The vision side of a VLM checkpoint: where its tensors sit, per layout, and what they are called here.
VISION_STORED = {"vision_tower.": "vision_tower.", "model.vision_tower.": "vision_tower.",
                 "multi_modal_projector.": "multi_modal_projector.",
                 "model.multi_modal_projector.": "multi_modal_projector."}


def load_vision(path: Path, config: ModelConfig, entries: dict[str, TensorEntry], *, dtype: torch.dtype,
                device: torch.device, check_finite: bool = True):
    """The vision tower + projector of a Mistral3-style VLM directory (config.json with vision_config and
    its tensors stored), or None for a text-only checkpoint. Checked like the text weights: every tensor
    present, none extra, shapes as the config says."""
    from .vision import VisionConfig, VisionTower

    top = read_json(path / "config.json")
    stored = [k for k in entries if k.startswith(tuple(VISION_STORED))]
    if not isinstance(top.get("vision_config"), dict):
        return None
    if not stored:
        raise ValueError(f"{path}: config.json describes a vision tower (vision_config) but no vision_tower.* / "
                         "multi_modal_projector.* tensors are stored")
    pre_file = path / "preprocessor_config.json"
    pre = read_json(pre_file) if pre_file.is_file() else None
    try:
        vc = VisionConfig.from_hf_dict(top, text_hidden_size=config.hidden_size, text_rms_eps=config.rms_norm_eps,
                                       preprocessor=pre)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'}: invalid vision config: {e}") from None
    if not 0 <= vc.image_token_id < config.vocab_size:
        raise ValueError(f"{path / 'config.json'}: image_token_index {vc.image_token_id} is outside the "
                         f"vocabulary ({config.vocab_size})")
    vc = vc.with_tokens(*_image_marker_ids(path, top, config.vocab_size))
    with torch.device("meta"):
        tower = VisionTower(vc)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    ours_of: dict[str, str] = {}
    for name in stored:
        prefix = next(p for p in sorted(VISION_STORED, key=len, reverse=True) if name.startswith(p))
        ours = VISION_STORED[prefix] + name[len(prefix):]
        if ours not in expected:
            raise ValueError(f"{entries[name].file}: unexpected vision tensor {name!r}")
        if ours in ours_of.values():
            raise ValueError(f"{path}: vision tensor {ours!r} is stored twice")
        if entries[name].shape != expected[ours]:
            raise ValueError(f"{entries[name].file}: tensor {name!r} has shape {entries[name].shape}, "
                             f"expected {expected[ours]}")
        if entries[name].dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{entries[name].file}: tensor {name!r} is stored as {entries[name].dtype}; "
                             "weights must be floating point")
        ours_of[name] = ours
    missing = sorted(set(expected) - set(ours_of.values()))
    if missing:
        raise ValueError(f"{path}: missing vision tensors: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in stored:
        by_file.setdefault(entries[name].file, []).append(name)
    for file, names in by_file.items():
        for name, t in load_tensors(file, names):
            t = t.to(device=device, dtype=dtype)
            if check_finite and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{file}: tensor {name!r} holds NaN or inf values")
            state[ours_of[name]] = t
    tower.load_state_dict(state, strict=True, assign=True)
    enc = tower.vision_tower
    d = vc.head_dim
    inv = 1.0 / (vc.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    enc.inv_freq_h, enc.inv_freq_w = inv[0::2].clone().to(device), inv[1::2].clone().to(device)
    return tower.eval()


def _image_marker_ids(path: Path, top: dict[str, Any], vocab: int) -> tuple[int | None, int | None]:
    """The [IMG_BREAK] / [IMG_END] ids: from config.json, else processor_config.json's token strings
    looked up in the tokenizer, else the tokenizer's [IMG_BREAK] / [IMG_END]."""
    ids: list[int | None] = []
    proc_file = path / "processor_config.json"
    proc = read_json(proc_file) if proc_file.is_file() else {}
    tok = None
    for key, default in (("image_break", "[IMG_BREAK]"), ("image_end", "[IMG_END]")):
        v = top.get(f"{key}_token_id")
        if v is None:
            if tok is None:
                from .tokenizer import load_tokenizer

                tok = load_tokenizer(path) or False
            name = proc.get(f"{key}_token", default) if isinstance(proc, dict) else default
            v = tok.token_to_id(name) if tok and isinstance(name, str) else None
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab):
            raise ValueError(f"{path}: {key}_token_id {v!r} is outside the vocabulary ({vocab})")
        ids.append(v)
    return ids[0], ids[1]


def _converted_from(path: Path) -> Path | None:
    """The GGUF file a `trimode convert` directory was made from, when it is still there."""
    f = path / "CONVERTED_FROM.json"
    try:
        g = Path(json.loads(f.read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return g if g.is_file() else None


# -- saving -----------------------------------------------------------------------------------
def base_state(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Base weights only (adapters are saved separately, in PEFT format), without the output head
    when it is tied to the embedding. state: the full weights to use instead of model.state_dict()
    (an FSDP2 run passes the ones it gathered from its shards)."""
    src = model.state_dict() if state is None else state
    out = {k: v for k, v in src.items() if ".adapters." not in k}
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _check_tokenizer(model: Transformer, tokenizer: Tokenizer | None) -> None:
    if tokenizer is not None:
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer must be a trimode Tokenizer, got {type(tokenizer).__name__}")
        tokenizer.check_model(model.config)


def save_model(model: Transformer, path: str | Path, *, tokenizer: Tokenizer | None = None,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` in the native layout at directory `path`, replacing a previous checkpoint atomically
    (`write_model` inside `_io.atomic_dir`)."""
    with atomic_dir(path, marker="config.json") as tmp:
        write_model(model, tmp, tokenizer=tokenizer, state=state)


def write_model(model: Transformer, directory: str | Path, *, tokenizer: Tokenizer | None = None,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """The native layout, written into `directory` (the one writer of it; `save_model` makes it atomic):
    config.json (ModelConfig.to_dict) + model.safetensors (base weights, or `state`: see base_state) +
    adapters/<name>/ (PEFT) for every adapter, + the tokenizer's files when `tokenizer` is given."""
    if getattr(model, "vision", None) is not None:
        raise ValueError("saving a vision-language model is not supported: its checkpoint directory (the "
                         "Mistral3 layout) stays the source; adapters are saved on their own (save_adapter)")
    if getattr(model, "quantization", None):
        raise ValueError("cannot save a quantized model: quantization happens at load time "
                         "(load_model(..., quantize=...)); save the unquantized one")
    _check_tokenizer(model, tokenizer)
    names = sorted(peft.adapter_names(model))
    for name in names:
        peft.check_adapter_name(name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(d)  # first, so our config.json always wins over a stray one
    write_json(d / "config.json", model.config.to_dict())
    save_tensors(base_state(model, state), d / WEIGHTS)
    for name in names:
        peft.write_adapter(model, name, d / ADAPTERS_DIR / name)


def export_nld(model: Transformer, path: str | Path, *, tokenizer: Tokenizer | None = None) -> None:
    """Write `model` in NLD's Hugging Face layout: encoder.* + diffusion_head.weight (always untied),
    and the "draft" adapter, if any, as PEFT under linear_spec_lora/. Other adapters are not part
    of that layout and are left out.
    """
    _check_tokenizer(model, tokenizer)
    hf = model.config.to_hf_dict()
    hf["tie_word_embeddings"] = False
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    back = ModelConfig.from_hf_dict(hf)
    want = model.config.replace(tie_word_embeddings=False)
    if back != want:
        diff = [k for k in want.to_dict() if getattr(back, k, None) != getattr(want, k, None)]
        raise ValueError(f"this config cannot be expressed in NLD's config.json (fields {diff} would change)")
    tensors = {f"encoder.{k}": v for k, v in base_state(model).items() if k != "lm_head.weight"}
    # clone: when tied the head is the embedding's storage, which safetensors refuses to write twice.
    tensors["diffusion_head.weight"] = model.head_weight().detach().clone()
    with atomic_dir(path, marker="config.json") as tmp:
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_json(tmp / "config.json", hf)
        save_tensors(tensors, tmp / WEIGHTS)
        if NLD_ADAPTER_NAME in peft.adapter_names(model):
            peft.write_adapter(
                model, NLD_ADAPTER_NAME, tmp / NLD_ADAPTER_DIR, module_prefix="encoder.", head_name="diffusion_head"
            )
