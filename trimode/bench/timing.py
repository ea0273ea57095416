"""TimedModel: a proxy that times every forward and counts NFE independently of the decoder.

The decoders call `model(tokens, positions, mask=, cache=, adapter=, adapter_tokens=, logits_at=)`
and read `model.config`, `model.device`, `model.new_cache`, `model.adapter_names`. The proxy passes
all of that through and records, for each call, its wall time and its shape: batch B, new tokens T,
key slots S read (cache length + T) and output-head positions. The forward kind is not known
here: `trimode.decode.run` yields one Step per forward, in order, and the runner labels the calls
with the Steps' kinds (and checks the counts agree).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Call:
    """One model forward as the wrapper saw it."""

    seconds: float
    B: int
    T: int
    S: int  # key slots read: committed cache length (max over rows) + T; T without a cache
    n_logits: int  # positions that went through the output head, per row
    adapter: bool
    kind: str = "?"  # filled in from the decoder's Step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedModel:
    """Wrap `model`; every call is timed (device-synchronised) and appended to `self.calls`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls: list[Call] = []

    def __getattr__(self, name: str):
        # Only reached for attributes not set in __init__: config, device, new_cache, adapter_names, ...
        return getattr(self.__dict__["model"], name)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, **kw) -> torch.Tensor:
        B, T = tokens.shape
        cache = kw.get("cache")
        S = (int(cache.length.max()) + T) if cache is not None else T
        at = kw.get("logits_at")
        n = int(at.shape[-1]) if at is not None else T
        dev = self.model.device
        synchronize(dev)
        t0 = time.perf_counter()
        out = self.model(tokens, positions, **kw)
        synchronize(dev)
        self.calls.append(Call(time.perf_counter() - t0, B, T, S, n, kw.get("adapter") is not None))
        return out

    def reset(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls
