"""Prometheus text-format metrics without a client library: counters, gauges and histograms with labels.

Updated from the engine's worker thread and the event loop alike, so every write takes one lock;
`render()` produces the exposition format (version 0.0.4) served at GET /metrics.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.lock = registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, registry: Registry, name: str, help: str) -> None:
        super().__init__(registry, name, help)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        with self.lock:
            return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: Registry, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(registry, name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.series: dict[Labels, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            s = self.series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, **labels: str) -> int:
        with self.lock:
            s = self.series.get(tuple(sorted(labels.items())))
            return s[-1] if s else 0

    def render(self) -> list[str]:
        out = self.header()
        for key, s in sorted(self.series.items()):
            for i, b in enumerate(self.buckets):
                out.append(f"{self.name}_bucket{_labels(key, ('le', _num(b)))} {s[i]}")
            out.append(f"{self.name}_sum{_labels(key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(key)} {s[-1]}")
        return out


class Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        with self.lock:
            lines = [line for m in self.metrics for line in m.render()]
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Every metric the server exports, in one place."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = Counter(r, "trimode_requests_total", "HTTP requests answered, by endpoint and status code")
        self.finished = Counter(r, "trimode_generations_total",
                                "generations finished, by decoding mode and finish reason")
        self.prompt_tokens = Counter(r, "trimode_prompt_tokens_total", "prompt tokens admitted, by mode")
        self.tokens = Counter(r, "trimode_generated_tokens_total", "tokens generated, by mode")
        self.forwards = Counter(r, "trimode_forwards_total",
                                "batched model forwards run by the engine, by mode and forward kind")
        self.row_forwards = Counter(r, "trimode_row_forwards_total",
                                    "forwards summed over the requests that took part in them, by mode")
        self.decisions = Counter(r, "trimode_mode_decisions_total",
                                 "decoding mode chosen per request: requested explicitly or picked by auto")
        self.tpf = Histogram(r, "trimode_tokens_per_forward", "tokens per forward of each finished request, by mode",
                             (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0))
        self.acceptance = Histogram(r, "trimode_acceptance_length",
                                    "accepted drafts + 1 bonus per verifying forward (linear, quadratic), by mode",
                                    (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32))
        self.batch = Histogram(r, "trimode_cycle_batch_size", "rows decoded together in one engine cycle, by mode",
                               (1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram(r, "trimode_time_to_first_token_seconds", "admission queue + prefill time",
                              (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queue_depth = Gauge(r, "trimode_queue_depth", "requests waiting for a slot")
        self.running = Gauge(r, "trimode_running_requests", "requests in the running batch (all decoders)")
        self.rejected = Counter(r, "trimode_rejected_total", "requests refused before decoding, by reason")

    def render(self) -> str:
        return self.registry.render()
