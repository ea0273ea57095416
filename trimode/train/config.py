"""Training configuration: a frozen dataclass, model presets, TOML/JSON files and `--key value` overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

# Model presets for training from scratch; vocab and special ids come from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "micro": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "head_dim": 16, "max_seq_len": 256},
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                 "head_dim": 32, "max_seq_len": 512},
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4,
                  "head_dim": 32, "max_seq_len": 1024},
    "base": {"hidden_size": 384, "intermediate_size": 1152, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
                 "head_dim": 48, "max_seq_len": 1024},
}


@dataclass(frozen=True)
class TrainConfig:
    # -- run --------------------------------------------------------------------------------------
    out_dir: str = "runs/default"
    seed: int = 0
    resume: bool = False
    # -- model: a preset trained from scratch, or `init` = a native checkpoint directory ----------
    preset: str = "tiny"
    init: str | None = None
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # -- data ---------------------------------------------------------------------------------------
    data: tuple[str, ...] = ()  # files, directories, globs, "@stdlib", "@data/REL" (REL under $TRIMODE_DATA)
    exclude: tuple[str, ...] = ()
    val_data: tuple[str, ...] = ()  # explicit validation files (else whole files split off by hash)
    suffixes: tuple[str, ...] = (".py", ".txt", ".md", ".rst", ".jsonl")
    max_file_bytes: int = 400_000
    text_field: str = "text"
    prompt_field: str | None = None  # .jsonl prompt/response pairs become a user and an assistant turn
    response_field: str | None = None
    tokenizer: str | None = None  # a dir with tokenizer.json; None: train a BPE (scratch) or use init's
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.02
    # -- optimisation --------------------------------------------------------------------------------
    steps: int = 1000
    stop_after: int | None = None  # stop this invocation at that step (a checkpoint is written)
    batch_size: int = 16  # global, sequences per optimizer step
    micro_batch_size: int = 8  # per rank and forward
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_frac: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = True
    threads: int | None = None
    device: str = "auto"  # auto (cuda when available) | cpu | cuda: the backend, mesh and autocast follow it
    dist: str = "ddp"  # with WORLD_SIZE > 1 (torchrun): ddp (DistributedDataParallel) | fsdp2 (fully_shard)
    # -- objective -----------------------------------------------------------------------------------
    alpha: float = 0.3
    eps: float = 1e-3
    dlm_type: str = "llada"
    block_lens: tuple[int, ...] = (32,)
    noise: str = "uniform"  # uniform | exp (Efficient-DLM position-dependent)
    half_life_ratio: float = 0.25
    ar_only_steps: int = 0  # stage 1: AR loss only; then the joint objective
    # -- bookkeeping -----------------------------------------------------------------------------------
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 200
    eval_batches: int = 8
    eval_at_start: bool = False  # also evaluate the initial model (step 0), e.g. after --init
    log_every: int = 10
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.init is None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "micro_batch_size", "seq_len", "save_every", "eval_every",
                     "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.noise not in ("uniform", "exp"):
            raise ValueError(f"noise must be 'uniform' or 'exp', got {self.noise!r}")
        if self.dist not in ("ddp", "fsdp2"):
            raise ValueError(f"dist must be 'ddp' or 'fsdp2', got {self.dist!r}")
        if self.dlm_type not in ("llada", "dream"):
            raise ValueError(f"dlm_type must be 'llada' or 'dream', got {self.dlm_type!r}")
        if not self.block_lens or any(b < 1 for b in self.block_lens):
            raise ValueError(f"block_lens must be positive, got {self.block_lens}")
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must lie in [0, 1), got {self.eps}")
        if self.alpha < 0 or self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0:
            raise ValueError("alpha, lr, min_lr and warmup_steps must be non-negative (lr > 0)")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}; known keys: {sorted(known)}")
        hints = get_type_hints(cls)
        d = {k: _coerce(k, v, hints[k]) for k, v in d.items()}
        for k in ("data", "val_data"):
            if k in d:
                d[k] = tuple(_data_path(k, s) for s in d[k])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


DATA_PREFIX = "@data/"  # a corpus path under the benchmark data directory (trimode.prompts.data_root)


def _data_path(key: str, spec: str) -> str:
    """`@data/REL` -> DATA/REL, DATA = $TRIMODE_DATA, else shared/data beside the checkout; other specs as given.
    A missing directory or file is a ValueError that names TRIMODE_DATA."""
    if not spec.startswith(DATA_PREFIX):
        return spec
    from ..prompts import data_root

    rel = spec[len(DATA_PREFIX):]
    env = os.environ.get("TRIMODE_DATA")
    root = data_root(required=False)
    where = f"$TRIMODE_DATA={env}" if env else "shared/data beside the checkout (the default; TRIMODE_DATA is unset)"
    if root is None:
        raise ValueError(f"{key} path {spec!r}: the data directory {where} does not exist; set TRIMODE_DATA to "
                         f"the directory holding {rel}")
    if not (root / rel).exists():
        raise ValueError(f"{key} path {spec!r}: {root / rel} does not exist (data directory {where}); set "
                         f"TRIMODE_DATA to the directory holding {rel}")
    return str(root / rel)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a parsed value (from JSON/TOML or a CLI string) to the field's annotated type."""
    origin, args = get_origin(hint), get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{key} cannot be null")
    if type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        return _coerce(key, value, inner)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if not value.startswith("[") else json.loads(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(key, v, args[0]) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key}: cannot convert {value!r} to {hint.__name__}") from None
    return value


def load_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON file as a flat dict (TOML tables are flattened: [train] lr = ... -> lr)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read config file {str(p)!r}: {e}") from None
    if p.suffix == ".json":
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON ({e})") from None
    elif p.suffix == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ValueError("TOML configs need Python >= 3.11 or `pip install tomli`") from None
        try:
            d = tomllib.loads(raw.decode())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: invalid TOML ({e})") from None
    else:
        raise ValueError(f"config file must end in .toml or .json, got {str(p)!r}")
    if not isinstance(d, dict):
        raise ValueError(f"{p}: the top level must be a table/object")  # noqa: TRY004
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` / `--flag` pairs (dashes in keys become underscores)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or len(a) == 2:
            raise ValueError(f"expected --key value, got {a!r}")
        key = a[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            val = argv[i + 1]
            i += 2
        else:
            val = "true"
            i += 1
        out[key.replace("-", "_")] = val
    return out


def build_config(file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """File values, then CLI overrides on top; unknown keys raise ValueError."""
    d = load_file(file) if file is not None else {}
    d.update(overrides)
    return TrainConfig.from_dict(d)
