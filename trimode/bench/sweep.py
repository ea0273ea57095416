"""Batch-size sweep: tokens/s of `ar` and of the best speculative configuration at each batch size,
the crossover between them, and `serving.json` for the server's `auto` mode.

At batch size B the first B prompts of the pooled suite (cycled if there are fewer) decode as one
batch in each configuration, alternating configurations `repeats` times and keeping each one's
fastest run. The crossover is the largest measured batch size up to which the speculative
configuration is faster than `ar` at every measured size; 0 when it already loses at the smallest.
The server reads `auto_crossover` as the concurrency above which `auto` picks `ar`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .runner import Config, decode_batch
from .suites import Prompt
from .timing import TimedModel

SERVING_FILE = "serving.json"


def sweep(
    model: torch.nn.Module,
    pool: Sequence[Prompt],
    spec: Config,
    batch_sizes: Sequence[int],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    repeats: int = 1,
    progress=None,
) -> list[dict]:
    """One row per batch size: tokens/s of ar and of `spec`, and their ratio."""
    if not pool:
        raise ValueError("the batch-size sweep needs at least one prompt")
    ar = Config("ar")
    out = []
    for B in batch_sizes:
        if B < 1:
            raise ValueError(f"batch sizes must be >= 1, got {B}")
        batch = [pool[i % len(pool)] for i in range(B)]
        best: dict[str, tuple[float, int]] = {}
        for _ in range(repeats):
            for cfg in (ar, spec):
                timed = TimedModel(model)
                rows, _, s = decode_batch(timed, batch, cfg, max_new_tokens=max_new_tokens, eos_id=eos_id)
                toks = sum(len(r.tokens) for r in rows)
                if cfg.label not in best or s < best[cfg.label][0]:
                    best[cfg.label] = (s, toks)
                if progress is not None:
                    progress()
        ar_s, ar_t = best[ar.label]
        sp_s, sp_t = best[spec.label]
        out.append({"batch": B, "ar_tokens_per_s": ar_t / ar_s, "spec_tokens_per_s": sp_t / sp_s,
                    "ratio": (sp_t / sp_s) / (ar_t / ar_s), "spec": spec.label})
    return out


def crossover(rows: Sequence[dict]) -> int:
    """Largest batch size up to which speculation wins at every measured size (0: never)."""
    n = 0
    for r in sorted(rows, key=lambda r: r["batch"]):
        if r["ratio"] > 1.0:
            n = r["batch"]
        else:
            break
    return n


def write_serving(model_dir: str | Path, info: dict) -> Path:
    """Merge `info` into model_dir/serving.json (other keys kept), atomically."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"model directory {d} does not exist")
    path = d / SERVING_FILE
    data: dict = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    data.update(info)
    from .._io import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # umask permissions, not mkstemp's 0600
    return path
