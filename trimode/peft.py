"""LoRA adapters in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

PEFT's `lora_A.weight` is (r, in) and `lora_B.weight` is (out, r), exactly our `A` and `B`, and its
scale is lora_alpha / r, exactly ours; so the only work is naming. PEFT keys are
`base_model.model.<module path in the wrapped model>.lora_{A,B}[.<adapter>].weight`, and the module
path carries whatever prefix the wrapped model uses (`encoder.` for NLD, `model.` for Hugging Face
causal LMs, none for ours). Loading strips any of those; saving writes the prefix asked for.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from . import draftvocab
from ._io import atomic_dir, load_tensors, read_header, read_json, save_tensors, write_json
from .lora import AdaptableLinear
from .model import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Prefixes a base model may put before our module paths: VLM text towers, NLD, HF causal LMs.
MODULE_PREFIXES = ("model.language_model.", "language_model.model.", "encoder.", "model.")
# Output-head spellings, by layout.
HEAD_ALIASES = {"diffusion_head": "lm_head", "language_model.lm_head": "lm_head"}
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_adapter_name(name: str) -> str:
    """Adapter names become directory names on save, so they must be plain file names."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"adapter name must be a plain identifier (letters, digits, _ . -), got {name!r}")
    return name


def linears(model: Transformer) -> dict[str, AdaptableLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptableLinear)}


def _candidates(path: str) -> list[str]:
    """Our module path(s) that a PEFT module path may denote, most literal first."""
    path = path.removeprefix("base_model.model.")
    out = [path]
    out += [path[len(p):] for p in MODULE_PREFIXES if path.startswith(p)]
    out += [HEAD_ALIASES[c] for c in list(out) if c in HEAD_ALIASES]
    return out


def _resolve_module(path: str, mods: dict[str, AdaptableLinear]) -> str | None:
    return next((c for c in _candidates(path) if c in mods), None)


def _target_exists(target: str, mods: dict[str, AdaptableLinear]) -> bool:
    # PEFT matches a list entry against the end of a module path ("o_proj" hits every o_proj).
    return any(m == c or m.endswith("." + c) for c in _candidates(target) for m in mods)


def _alpha_for(raw_path: str, cfg: dict[str, Any]) -> float:
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", raw_path):
            return float(alpha)
    return float(cfg["lora_alpha"])


def read_adapter_config(path: Path) -> dict[str, Any]:
    cfg = read_json(path / ADAPTER_CONFIG)
    f = path / ADAPTER_CONFIG
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise ValueError(f"{f}: {key}={bad} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{f}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{f}: modules_to_save={cfg['modules_to_save']} is not supported")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{f}: lora_alpha must be a positive number, got {alpha!r}")
    return cfg


def load_adapter(model: Transformer, path: str | Path, *, name: str = "draft") -> Transformer:
    """Attach the PEFT LoRA in directory `path` to `model` as adapter `name`; returns `model`.

    Everything is validated before the model is touched: each tensor's module must exist, every
    `target_modules` entry must name a linear of the model, and A / B must be (r, in) / (out, r).
    """
    check_adapter_name(name)
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter directory {path} does not exist")
    cfg = read_adapter_config(path)
    wfile = path / ADAPTER_WEIGHTS
    if not wfile.is_file():
        raise ValueError(f"no {ADAPTER_WEIGHTS} in {path} (only safetensors adapters are supported)")
    header = read_header(wfile)
    mods = linears(model)
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [] if targets == "all-linear" else None  # a regex: matched by PEFT, not checked here
    for t in targets or []:
        if not _target_exists(t, mods):
            raise ValueError(f"{path / ADAPTER_CONFIG}: target module {t!r} does not exist in the model")

    pairs: dict[str, dict[str, str]] = {}  # our module path -> {"A": key, "B": key}
    raw_paths: dict[str, str] = {}
    for key in header:
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{wfile}: unexpected tensor {key!r} (expected <module>.lora_A/lora_B.weight)")
        module = _resolve_module(m["module"], mods)
        if module is None:
            raise ValueError(f"{wfile}: tensor {key!r} targets module {m['module']!r}, which does not exist")
        if m["ab"] in pairs.setdefault(module, {}):
            raise ValueError(f"{wfile}: two tensors for {module}.lora_{m['ab']}: {pairs[module][m['ab']]!r}, {key!r}")
        pairs[module][m["ab"]] = key
        raw_paths[module] = m["module"].removeprefix("base_model.model.")
    if not pairs:
        raise ValueError(f"{wfile} holds no LoRA tensors")

    plan: list[tuple[str, int, float]] = []
    for module, ab in sorted(pairs.items()):
        for part in "AB":
            if part not in ab:
                raise ValueError(f"{wfile}: module {module!r} has lora_{'BA'['AB'.index(part)]} but no lora_{part}")
        lin = mods[module]
        r = header[ab["A"]].shape[0] if len(header[ab["A"]].shape) == 2 else -1
        for part, want in (("A", (r, lin.in_features)), ("B", (lin.out_features, r))):
            got = header[ab[part]].shape
            if r < 1 or got != want:
                raise ValueError(
                    f"{wfile}: {ab[part]} has shape {got}, expected {want} for {module} "
                    f"(in_features={lin.in_features}, out_features={lin.out_features}, r={r})"
                )
        alpha = _alpha_for(raw_paths[module], cfg)
        if cfg.get("use_rslora"):
            alpha *= math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); ours is alpha / r
        plan.append((module, r, alpha))

    tensors = dict(load_tensors(wfile, list(header)))
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{wfile}: {key} holds non-finite values")
    vocab = draftvocab.read(path, model.config.vocab_size)  # the drafter's token subset, if it has one
    for module, r, alpha in plan:
        lora = mods[module].add_adapter(name, r, alpha)
        with torch.no_grad():
            lora.A.copy_(tensors[pairs[module]["A"]])
            lora.B.copy_(tensors[pairs[module]["B"]])
    if vocab is not None:
        model.set_draft_vocab(vocab)
    return model


def write_adapter(
    model: Transformer, name: str, path: Path, *, module_prefix: str = "", head_name: str = "lm_head"
) -> None:
    """Write adapter `name` in PEFT format into directory `path` (created; not atomic: see save_adapter).

    module_prefix: prepended to our module paths, e.g. "encoder." for NLD, so PEFT on that model
    finds its modules. head_name: how the output head is called in that model.
    """
    mods = {p: m for p, m in linears(model).items() if name in m.adapters}
    if not mods:
        raise ValueError(f"model has no adapter named {name!r}; it has {sorted(adapter_names(model))}")

    def external(p: str) -> str:
        # The head sits beside the prefixed body (NLD: encoder.* and diffusion_head), not inside it.
        return head_name if p == "lm_head" else module_prefix + p

    loras = {p: m.adapters[name] for p, m in mods.items()}
    first = next(iter(loras.values()))
    r, alpha = first.r, first.alpha
    rank_pattern = {external(p): lo.r for p, lo in loras.items() if lo.r != r}
    alpha_pattern = {external(p): _num(lo.alpha) for p, lo in loras.items() if lo.alpha != alpha}
    leaves = sorted({p.rsplit(".", 1)[-1] for p in mods})
    every = {p for p in linears(model) if p.rsplit(".", 1)[-1] in leaves}
    # Leaf names ("o_proj") when the adapter covers every such linear, else the exact module paths.
    if every == set(mods):
        targets = [head_name if leaf == "lm_head" else leaf for leaf in leaves]
    else:
        targets = sorted(external(p) for p in mods)
    cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": _num(alpha),
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for p, lo in loras.items():
        tensors[f"base_model.model.{external(p)}.lora_A.weight"] = lo.A
        tensors[f"base_model.model.{external(p)}.lora_B.weight"] = lo.B
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / ADAPTER_CONFIG, cfg)
    save_tensors(tensors, path / ADAPTER_WEIGHTS)
    if getattr(model, "draft_vocab", None) is not None:  # the drafter's token subset travels with it
        draftvocab.write(path, model.draft_vocab, vocab_size=model.config.vocab_size)


def save_adapter(model: Transformer, name: str, path: str | Path) -> None:
    """Save adapter `name` of `model` as a PEFT LoRA directory at `path`, atomically."""
    with atomic_dir(path, marker=ADAPTER_CONFIG) as tmp:
        write_adapter(model, name, tmp)


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def adapter_names(model: Transformer) -> set[str]:
    """Names of the adapters attached anywhere in `model`."""
    return {n for m in linears(model).values() for n in m.adapters}
