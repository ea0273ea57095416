"""A model-free stand-in for the step-level decoder API, for fast server tests.

`FakeRow` / `make_fake_decoder` follow the contract of `trimode.decode.Row` / `make_decoder`
(docs/dev/decoder-api.md): admit() runs one "prefill" that yields each new row's first token, cycle()
advances every running row (ar: 1 token per forward; linear: 2 per cycle of 2 forwards; quadratic:
2 per forward; diffusion: a block). Row b's output is a fixed token script, rotated by its prompt,
so it depends on the prompt only, never on the batch. A `gate` (threading.Event) makes cycle() wait,
which lets tests fill the queue deterministically.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

SCRIPT = ("def add(a, b):\n    return a + b  # sum of the two ünïcödé values \u20ac\n\n"
          "class Point:\n    x = 0\n    y = 1\n\n")


class FakeRow:
    def __init__(self, prompt, *, max_new_tokens: int, stop_ids=(), index: int = 0, sampling=None) -> None:
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids)
        self.index = index
        self.sampling = sampling
        self.tokens: list[int] = []
        self.done = False
        self.finish_reason: str | None = None
        self.trace: list[list] = []

    def cancel(self) -> None:
        if not self.done:
            self.done, self.finish_reason = True, "cancelled"

    def emit(self, toks) -> None:
        for t in toks:
            if self.done:
                return
            if t in self.stop_ids:
                self.done, self.finish_reason = True, "stop"
                return
            self.tokens.append(t)
            self.trace[-1][1] += 1
            if len(self.tokens) >= self.max_new_tokens:
                self.done, self.finish_reason = True, "length"

    def stats(self, mode: str) -> dict:
        n = len(self.tokens)
        nfe = len(self.trace)
        acc = [k for kind, k in self.trace if kind in ("verify", "quadratic")]
        return {"mode": mode, "tokens": n, "nfe": nfe, "tpf": n / nfe if nfe else 0.0, "acceptance": acc}


@dataclass
class FakeStep:
    kind: str
    rows: list
    new_tokens: list


class FakeDecoder:
    PER_CYCLE = {"ar": (("ar", 1),), "linear": (("draft", 0), ("verify", 2)), "quadratic": (("quadratic", 2),),
                 "diffusion": (("denoise", 0), ("commit", 3))}

    def __init__(self, script: list[int], mode: str, cfg, gate: threading.Event | None,
                 delay: float | dict[str, float]) -> None:
        self.script = script
        self.mode = mode
        self.cfg = cfg
        self.gate = gate
        self.delay = delay
        self.running: list[FakeRow] = []

    def _next(self, row: FakeRow, n: int) -> list[int]:
        start = sum(row.prompt) % 7 + len(row.tokens)
        return [self.script[(start + i) % len(self.script)] for i in range(n)]

    def admit(self, rows):
        for r in rows:
            if not r.prompt or r.max_new_tokens < 1:
                raise ValueError(f"bad row {r!r}")
        for r in rows:
            r.trace.append(["prefill", 0])
            r.emit(self._next(r, 1))
        self.running += [r for r in rows if not r.done]
        return [FakeStep("prefill", list(rows), [list(r.tokens) for r in rows])]

    def cycle(self):
        if self.gate is not None:
            self.gate.wait()
        delay = self.delay.get(self.mode, 0.0) if isinstance(self.delay, dict) else self.delay
        if delay:
            time.sleep(delay)
        steps = []
        rows = [r for r in self.running if not r.done]
        for kind, n in self.PER_CYCLE[self.mode]:
            live = [r for r in rows if not r.done]
            for r in live:
                r.trace.append([kind, 0])
                r.emit(self._next(r, n))
            steps.append(FakeStep(kind, live, [None] * len(live)))
        self.running = [r for r in self.running if not r.done]
        return steps


def fake_api(tokenizer, *, gate: threading.Event | None = None, delay: float | dict[str, float] = 0.0,
             eos_every: int = 0):
    """(make_decoder, Row) driven by a script of real token ids; an EOS after every `eos_every` tokens.
    delay: seconds each cycle sleeps (a dict: per mode, to model cheap and expensive decoders)."""
    script = tokenizer.encode(SCRIPT)
    if eos_every:
        script = [t for i in range(0, len(script), eos_every) for t in script[i:i + eos_every] + [tokenizer.eos_id]]

    def make_decoder(model, mode, cfg):
        return FakeDecoder(script, getattr(mode, "value", mode), cfg, gate, delay)

    return make_decoder, FakeRow


def fake_model(vocab_size: int, *, max_seq_len: int = 1024, mask_token_id: int | None = 2, eos: int | None = 0):
    """Just enough of a model for the server: a config."""
    return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len,
                                                  mask_token_id=mask_token_id, eos_token_id=eos, block_len=8))
