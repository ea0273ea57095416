"""The decoding modes: the one vocabulary of mode names (no torch import, so CLIs can offer the
choices cheaply). The decoders register against `Mode`; the server and the benchmark take their
choices from here; at the JSON / HTTP boundary a mode is its value."""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """The decoding modes: the one vocabulary of mode names (the CLIs, the server and the benchmark
    take their choices from here; at the JSON / HTTP boundary a mode is its value)."""

    AR = "ar"
    DIFFUSION = "diffusion"
    LINEAR = "linear"
    QUADRATIC = "quadratic"

    def __str__(self) -> str:  # the value, on every Python version (3.11 changed mixed-in enums' str)
        return self.value

    __format__ = str.__format__

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown mode {value!r}; choose one of {', '.join(m.value for m in cls)}"
            ) from None


MODE_NAMES = tuple(m.value for m in Mode)
SPECULATIVE_MODES = (Mode.LINEAR.value, Mode.QUADRATIC.value)  # draft, then verify: lossless
