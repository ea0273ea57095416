"""Roofline: this machine's matmul rate and memory bandwidth, and FLOPs / bytes per forward.

Per forward of B rows, T new tokens, S key slots read and n output-head positions per row:

  FLOPs = 2 B T L P_layer            (the linear layers of every block)
        + 4 B T S L H D              (attention scores QK^T and the weighted sum AV)
        + 2 B n hidden V             (output head, only where logits are read)
  bytes = (L P_layer + V hidden) w   (every weight read once: the batch shares them)
        + 2 L B S kv_dim w           (keys and values read)
        + 2 L B T kv_dim w           (keys and values written)

with w the bytes per weight. Activations and masks are left out (small beside the weights here).
A forward cannot take less than max(FLOPs / peak FLOP/s, bytes / peak bandwidth); `fraction` is that
bound divided by the measured time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import ModelConfig


@dataclass(frozen=True)
class Machine:
    flops_per_s: float  # dense matmul, in the model's dtype
    bytes_per_s: float  # large-tensor copy (read + write)
    dtype: str
    device: str

    def as_dict(self) -> dict:
        return {"matmul_flops_per_s": self.flops_per_s, "memory_bytes_per_s": self.bytes_per_s,
                "dtype": self.dtype, "device": self.device}


def _best_time(fn, *, reps: int, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_machine(*, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    n: int | None = None, mbytes: int | None = None, reps: int = 5) -> Machine:
    """Best-of-`reps` matmul rate (n x n by n x n) and copy bandwidth (mbytes MiB copied)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    mbytes = mbytes or (2048 if cuda else 128)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    flops = 2 * n**3 / _best_time(lambda: a @ b, reps=reps, device=device)
    numel = mbytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bw = 2 * numel * 4 / _best_time(lambda: dst.copy_(src), reps=reps, device=device)
    return Machine(flops, bw, str(dtype).replace("torch.", ""), str(device))


def layer_params(c: ModelConfig) -> int:
    return c.hidden_size * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def forward_cost(
    c: ModelConfig, *, B: int, T: int, S: int, n_logits: int, bytes_per_weight: int
) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward (see the module docstring)."""
    L = c.num_layers
    flops = (2 * B * T * L * layer_params(c) + 4 * B * T * S * L * c.q_dim
             + 2 * B * n_logits * c.hidden_size * c.vocab_size)
    w = bytes_per_weight
    weights = (L * layer_params(c) + c.vocab_size * c.hidden_size) * w
    kv = 2 * L * B * (S + T) * c.kv_dim * w
    return float(flops), float(weights + kv)


def bound_seconds(flops: float, nbytes: float, m: Machine) -> float:
    return max(flops / m.flops_per_s, nbytes / m.bytes_per_s)


def nominal_kinds(block_len: int, *, context: int) -> dict[str, tuple[int, int]]:
    """(T, n_logits) per forward kind at batch 1 for block length k (quadratic: k(k+1) tokens)."""
    k = block_len
    return {
        "prefill": (context, 1),
        "ar": (1, 1),
        "draft": (k, k - 1),
        "verify": (k, k),
        "denoise": (k, k - 1),
        "commit": (k, 1),
        "quadratic": (k * (k + 1), k + k * (k - 1)),
    }
