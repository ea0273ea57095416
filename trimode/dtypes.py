"""One table of dtype names for every flag and config field, and the `auto` choice.

`auto` is the fastest dtype a device computes natively: bfloat16 on CUDA and on CPUs whose matmuls
run bfloat16 through oneDNN (AVX-512 or AMX, e.g. Intel Sapphire Rapids), else float32. On an
AVX2-only CPU (measured on an AMD EPYC, SmolLM2-135M, one thread) bfloat16 matmuls fall back to a
slow path: a 16-token forward costs 7.5x a 1-token one, against 2.3x in float32, and AR is no
faster; there float32 is both faster and exact.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "double": torch.float64,
}
AS_STORED = ("stored", None)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (PyTorch's own oneDNN bf16 check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def auto_reason(device: str | torch.device = "cpu") -> str:
    """One line saying what `auto` chose here and why (printed by the demo)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16 (CUDA)"
    if cpu_has_fast_bf16():
        return f"bfloat16 (this CPU runs bf16 matmuls natively: {torch.backends.cpu.get_cpu_capability()})"
    return (f"float32 (this CPU, {torch.backends.cpu.get_cpu_capability()}, has no native bf16 matmul: "
            "bf16 would be slower)")


def parse_dtype(name: str | torch.dtype | None, *, device: str | torch.device = "cpu",
                allowed: tuple[torch.dtype, ...] | None = None) -> torch.dtype | None:
    """A dtype flag: a name in DTYPES, `auto` (see auto_dtype), or None / `stored` (keep the
    checkpoint's, returned as None). Raises ValueError naming the choices."""
    if isinstance(name, torch.dtype):
        dt = name
    elif name in AS_STORED:
        return None
    elif name == "auto":
        dt = auto_dtype(device)
    elif isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        dt = DTYPES[name.removeprefix("torch.")]
    else:
        names = sorted({str(d).removeprefix("torch.") for d in (allowed or DTYPES.values())})
        raise ValueError(f"unknown dtype {name!r}; choose {', '.join(names)} or auto")
    if allowed is not None and dt not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"dtype {str(dt).removeprefix('torch.')} is not supported here; choose {names}")
    return dt
