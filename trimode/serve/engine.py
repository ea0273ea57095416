"""The serving engine: one worker thread owns the model and its decoders; continuous batching.

Requests (`Job`s) wait in a bounded queue. Between decoder cycles the worker admits what the limits
allow (one prefill forward per decoder config), then runs one cycle of the live decoder that has used
the least worker time (a fair time share). There is one decoder per distinct (mode, block_len,
threshold), so rows that share a config batch together; rows finish independently and leave at the
next boundary. Cost is bounded: a decoder takes rows only while rows x its forward width stays within
`max_cycle_tokens`, and at most `max_decoders` configs run at once; the rest wait their turn.
After each admit / cycle the worker turns every row's new tokens into text (stop strings are matched
there, and a row that hits one is cancelled at once) and hands events to the job's `sink`, which the
HTTP layer points at an asyncio queue through `loop.call_soon_threadsafe`: the event loop never waits
on the model.

Mode "auto" is resolved when a job is admitted: the speculative mode (`spec_mode`) while the number
of requests in the system (running + queued, this one included) is at most `auto_crossover`, plain
AR above it, where batching already keeps the hardware busy.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..modes import SPECULATIVE_MODES
from .metrics import ServerMetrics
from .schemas import APIError, usage
from .text import TextStream

log = logging.getLogger("trimode.serve")

SPEC_MODES = SPECULATIVE_MODES


@dataclass
class EngineConfig:
    max_running: int = 64
    max_queue: int = 256
    spec_mode: str = "linear"  # what "auto" picks at low load
    auto_crossover: int = 8  # "auto" runs spec_mode while running + queued <= this, else ar
    default_max_tokens: int = 1024  # DecodeConfig default; each row carries its own budget
    # Cost bounds: a decoder admits rows only while rows x forward width stays within this many tokens
    # (one request alone may not exceed it: the app answers 400), and at most max_decoders distinct
    # decoding configs run at once (others wait in the queue), so no request can make every cycle slow.
    max_cycle_tokens: int = 1024
    max_decoders: int = 8

    def __post_init__(self) -> None:
        if self.max_cycle_tokens < 1 or self.max_decoders < 1:
            raise ValueError(f"max_cycle_tokens and max_decoders must be >= 1, got {self.max_cycle_tokens}, "
                             f"{self.max_decoders}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.spec_mode not in SPEC_MODES:
            raise ValueError(f"spec_mode must be one of {SPEC_MODES}, got {self.spec_mode!r}")
        if self.auto_crossover < 0:
            raise ValueError(f"auto_crossover must be >= 0, got {self.auto_crossover}")


@dataclass(frozen=True)
class Decoding:
    """The job was admitted: the decoding it runs (mode, requested mode, block_len, threshold)."""

    info: dict


@dataclass(frozen=True)
class Text:
    """New output text (a delta)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The job finished: "stop" | "length" | "cancelled", and its OpenAI usage."""

    reason: str
    usage: dict


@dataclass(frozen=True)
class Failed:
    """The job failed with an error the client is told."""

    error: APIError


Event = Decoding | Text | Done | Failed


@dataclass(eq=False)
class Job:
    """One request inside the engine. `sink(event)` is called from the worker thread with a
    `Decoding` once admitted, `Text` deltas, then `Done` or `Failed`."""

    prompt: list[int]
    max_tokens: int
    mode: str  # "auto" or a decoder mode
    block_len: int
    threshold: float
    stop_ids: frozenset[int]
    stops: list[str]
    sink: Callable[[Event], None]
    sampling: Any = None  # SamplingParams; None = greedy
    think: tuple | None = None  # (thinking budget, ids of <think>, ids of </think>) or None
    image_embeds: Any = None  # a VLM prompt's image features (n_image_tokens, hidden), placed by the prefill
    # engine state
    cancelled: bool = False
    finished: bool = False
    chosen: str | None = None
    row: Any = None
    key: tuple | None = None
    text: TextStream | None = None
    sent: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None


def forward_width(mode: str, block_len: int) -> int:
    """Tokens one row puts through the widest forward of a cycle: the cost unit of scheduling."""
    return {"ar": 1, "quadratic": block_len * (block_len + 1)}.get(mode, block_len)


def config_key(mode: str, block_len: int, threshold: float) -> tuple:
    """Decoders are shared by rows whose decoding options agree on everything the mode reads."""
    if mode == "ar":
        return ("ar", 1, None)
    if mode in SPEC_MODES:
        return (mode, block_len, None)
    return (mode, block_len, threshold)


def _default_api() -> tuple[Callable, type]:
    from ..decode import Row, make_decoder  # the step-level decoder API

    return make_decoder, Row


class Engine:
    """Owns the model on one worker thread. Thread-safe entry points: submit, cancel, snapshot."""

    def __init__(self, model, tokenizer, config: EngineConfig, metrics: ServerMetrics | None = None, *,
                 api: tuple[Callable, type] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self._api = api
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._running: dict[int, Job] = {}  # id(job) -> job, admitted and not finished
        self._decoders: dict[tuple, Any] = {}
        self._spent: dict[tuple, float] = {}  # worker seconds each live decoder has used (fair share)
        self._last_cycle: dict[tuple, float] = {}  # seconds of each live decoder's latest cycle
        self._drain_deadline: float | None = None  # set by drain(): monotonic time the grace period ends
        self._stop = False
        self._thread: threading.Thread | None = None
        self.cycles = 0
        self.errors = 0

    # -- thread-safe API ------------------------------------------------------------------------
    def start(self) -> None:
        if self._api is None:
            self._api = _default_api()
        self._thread = threading.Thread(target=self._loop, name="trimode-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drain(self, grace: float) -> None:
        """Graceful shutdown: refuse new jobs from now on (503 with Retry-After), let running and
        queued ones go on for `grace` seconds, then end every one still unfinished with a clean 503."""
        with self._cv:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + max(0.0, grace)
                log.warning("draining: no new requests; %d running and %d queued get %.1f s",
                            len(self._running), len(self._pending), grace)
            self._cv.notify_all()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def submit(self, job: Job) -> None:
        """Queue a job; APIError 429 (with Retry-After) when the queue is full, 503 when stopping."""
        with self._cv:
            if self._drain_deadline is not None:
                raise APIError(503, "the server is shutting down; retry on another instance", type="server_error",
                               code="unavailable", headers={"Retry-After": "5"})
            if self._stop or not self.alive:
                raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
            free_slots = max(0, self.config.max_running - len(self._running))
            if len(self._pending) >= self.config.max_queue + free_slots:
                self.metrics.rejected.inc(reason="queue_full")
                raise APIError(429, f"server busy: {len(self._running)} requests running and "
                                    f"{len(self._pending)} queued (limit {self.config.max_queue}); retry later",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone or timed out: drop a queued job now, free a running one's slot at the
        next boundary."""
        with self._cv:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            try:
                self._pending.remove(job)
                job.finished = True
                self.metrics.queue_depth.set(len(self._pending))
            except ValueError:
                self._cancels.append(job)
            self._cv.notify_all()

    def snapshot(self) -> dict[str, int]:
        with self._cv:
            return {"queued": len(self._pending), "running": len(self._running), "decoders": len(self._decoders)}

    # -- worker ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stop or self._pending or self._cancels or self._running):
                        self._cv.wait()
                    if self._stop:
                        break
                    cancels, self._cancels = self._cancels, []
                    late = self._drain_deadline is not None and time.monotonic() >= self._drain_deadline
                    left = list(self._pending) if late else []
                    if late:
                        self._pending.clear()
                if late:  # the grace period is over: every unfinished job ends with a clean error
                    self.metrics.queue_depth.set(0)
                    for job in left + [j for j in self._running.values() if not j.finished]:
                        self._fail(job, APIError(503, "the server shut down before this request finished",
                                                 type="server_error", code="unavailable"))
                    continue
                for job in cancels:  # the slot is free now; the decoder drops the row at its next boundary
                    if job.row is not None and not job.finished:
                        job.row.cancel()
                        self._finish(job, "cancelled")
                try:
                    self._admit()
                    self._cycle()
                except Exception:  # noqa: BLE001 (a bug here must not kill the only thread that decodes)
                    log.exception("engine iteration failed; failing every running request")
                    self.errors += 1
                    self._decoders.clear()
                    for job in [j for j in self._running.values() if not j.finished]:
                        self._fail(job, APIError(500, "internal error in the engine", type="server_error"))
        for job in list(self._running.values()):
            self._fail(job, APIError(503, "the server is shutting down", type="server_error"))

    def _take(self) -> list[Job]:
        """Queued jobs that may start now, in arrival order: within max_running, within their decoder's
        cycle-token budget (rows x forward width), and within max_decoders live decoding configs.
        The others keep their place in the queue."""
        cfg = self.config
        with self._cv:
            free = cfg.max_running - len(self._running)
            load = len(self._running) + len(self._pending)
            rows = {k: len(d.running) for k, d in self._decoders.items() if d.running}
            take: list[Job] = []
            keep: collections.deque[Job] = collections.deque()
            for job in self._pending:
                mode = job.mode
                if mode == "auto":
                    mode = cfg.spec_mode if load <= cfg.auto_crossover else "ar"
                key = config_key(mode, job.block_len, job.threshold)
                n = rows.get(key, 0)
                fits = len(take) < free and (n > 0 or len(rows) < cfg.max_decoders)
                if not fits or (n > 0 and (n + 1) * forward_width(mode, job.block_len) > cfg.max_cycle_tokens):
                    keep.append(job)
                    continue
                rows[key] = n + 1
                job.chosen, job.key = mode, key
                take.append(job)
                self._running[id(job)] = job
            self._pending = keep
            self.metrics.queue_depth.set(len(self._pending))
            self.metrics.running.set(len(self._running))
        return take

    def _admit(self) -> None:
        take = self._take()
        if not take:
            return
        make_decoder, row_cls = self._api
        groups: dict[tuple, list[Job]] = {}
        for job in take:
            self.metrics.decisions.inc(mode=job.chosen, requested=job.mode)
            job.text = TextStream(self.tokenizer, job.stops)
            try:
                job.row = row_cls(job.prompt, max_new_tokens=job.max_tokens, stop_ids=job.stop_ids,
                                  index=0, sampling=job.sampling)
                if job.image_embeds is not None:  # the prompt is already expanded (one token per feature)
                    job.row.image_embeds = job.image_embeds
                if job.think is not None:
                    from ..decode.thinking import ThinkState

                    job.row.think = ThinkState.for_prompt(job.prompt, *job.think)
            except ValueError as e:
                self._fail(job, APIError(400, str(e)))
                continue
            groups.setdefault(job.key, []).append(job)
        for key, jobs in groups.items():
            try:
                dec = self._decoders.get(key)
                if dec is None:
                    dec = self._decoders[key] = self._new_decoder(make_decoder, key)
                batch = [j for j in jobs if not j.cancelled]
                for j in jobs:
                    if j.cancelled:
                        self._finish(j, "cancelled")
                if not batch:
                    continue
                self._send_decoding(batch)
                try:
                    steps = dec.admit([j.row for j in batch])
                except ValueError:
                    steps = self._admit_one_by_one(dec, batch)
                self._count(key, steps)
                self._deliver([j for j in batch if not j.finished])
            except Exception as e:  # noqa: BLE001 (a decoder failure must not take the worker down)
                self._crash(key, [j for j in jobs if not j.finished], e)

    def _admit_one_by_one(self, dec, batch: list[Job]) -> list:
        """A ValueError from admit names one bad row; find it so the others still run."""
        steps = []
        for j in batch:
            try:
                steps += list(dec.admit([j.row]) or [])
            except ValueError as e:
                self._fail(j, APIError(400, str(e)))
        return steps

    def _new_decoder(self, make_decoder: Callable, key: tuple):
        from ..decode import DecodeConfig, Mode

        mode, block_len, threshold = key
        from ..models import stored_tree_min_prob, stored_tree_nodes

        # Linear at the model's measured block length verifies greedy batches with its measured tree.
        cfg = DecodeConfig(max_new_tokens=self.config.default_max_tokens, block_len=block_len,
                           threshold=0.9 if threshold is None else threshold,
                           tree_nodes=stored_tree_nodes(self.model, mode, block_len),
                           tree_min_prob=stored_tree_min_prob(self.model, mode, block_len))
        return make_decoder(self.model, Mode.parse(mode), cfg)

    def _cycle(self) -> None:
        """One cycle of the live decoder that has used the least worker time: decoders share the worker
        by time, not by turns, so a decoder with expensive cycles runs less often and one with cheap
        cycles (AR beside a wide quadratic) is not held to the expensive one's pace. A new decoder
        starts at the least time of the others less the longest cycle among them: it does not catch
        up on the past, but a short request that arrives beside a long-running wide one runs up to one
        of the wide one's cycles before that one goes again (forwards cannot be interrupted, so this
        is what keeps a light request's latency near an idle server's)."""
        for k in [k for k, d in self._decoders.items() if not d.running]:
            del self._decoders[k]  # an idle decoder holds no rows; a new one is cheap
            self._spent.pop(k, None)
            self._last_cycle.pop(k, None)
        live = list(self._decoders)
        if not live:
            return
        floor = min((self._spent[k] for k in live if k in self._spent), default=0.0)
        credit = max(self._last_cycle.values(), default=0.0)
        for k in live:
            self._spent.setdefault(k, floor - credit)
        key = min(live, key=lambda k: self._spent[k])
        dec = self._decoders[key]
        jobs = [j for j in self._running.values() if j.key == key]
        t0 = time.perf_counter()
        try:
            self.metrics.batch.observe(len(dec.running), mode=key[0])
            steps = dec.cycle()
            self._last_cycle[key] = time.perf_counter() - t0
            self._spent[key] += self._last_cycle[key]
            self.cycles += 1
            self._count(key, steps)
            self._deliver(jobs)
        except Exception as e:  # noqa: BLE001
            self._crash(key, jobs, e)

    def _crash(self, key: tuple, jobs: list[Job], e: Exception) -> None:
        """A decoder raised: its state is suspect, so it goes, and every request in it gets an error."""
        jobs = {id(j): j for j in jobs + [j for j in self._running.values() if j.key == key]}.values()
        jobs = [j for j in jobs if not j.finished]
        log.exception("decoder %s failed; its %d requests are answered with errors", key, len(jobs))
        self.errors += 1
        self._decoders.pop(key, None)
        for j in jobs:
            self._fail(j, APIError(500, f"internal error in the {key[0]} decoder: {type(e).__name__}",
                                   type="server_error", code="decoder_error"))

    def _count(self, key: tuple, steps) -> None:
        for s in steps or ():
            self.metrics.forwards.inc(mode=key[0], kind=str(getattr(s, "kind", "?")))

    # -- events ---------------------------------------------------------------------------------
    def _send(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # noqa: BLE001 (the client's loop may be closed; the job just ends)
            job.cancelled = True

    def _send_decoding(self, jobs: list[Job]) -> None:
        for j in jobs:
            mode, block_len, threshold = j.key
            info: dict[str, Any] = {"mode": mode, "requested": j.mode}
            if mode != "ar":
                info["block_len"] = block_len
            if mode == "diffusion":
                info["threshold"] = threshold
            self._send(j, Decoding(info))

    def _deliver(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for j in jobs:
            if j.finished:
                continue
            row = j.row
            new = row.tokens[j.sent:]
            if new:
                j.sent = len(row.tokens)
                if j.t_first is None:
                    j.t_first = now
                    self.metrics.ttft.observe(now - j.t_submit, mode=j.chosen)
                text = j.text.feed(new)
                if text:
                    self._send(j, Text(text))
            if j.text.stopped:
                row.cancel()  # the decoder drops it at the next boundary
                self._finish(j, "stop")
            elif row.done:
                tail = j.text.finish()
                if tail:
                    self._send(j, Text(tail))
                self._finish(j, row.finish_reason or "length")

    def _finish(self, job: Job, reason: str) -> None:
        stats = job.row.stats(job.chosen) if job.row is not None else {"nfe": 0, "acceptance": []}
        n = len(job.row.tokens) if job.row is not None else 0
        nfe = int(stats.get("nfe", 0))
        m = self.metrics
        m.finished.inc(mode=job.chosen or "none", reason=reason)
        m.prompt_tokens.inc(len(job.prompt), mode=job.chosen or "none")
        m.tokens.inc(n, mode=job.chosen or "none")
        m.row_forwards.inc(nfe, mode=job.chosen or "none")
        if nfe:
            m.tpf.observe(n / nfe, mode=job.chosen)
        for a in stats.get("acceptance") or ():
            m.acceptance.observe(a, mode=job.chosen)
        self._send(job, Done(reason, usage(len(job.prompt), n, nfe)))
        self._retire(job)

    def _fail(self, job: Job, err: APIError) -> None:
        if job.row is not None and not job.row.done:
            job.row.cancel()
        self._send(job, Failed(err))
        self._retire(job)

    def _retire(self, job: Job) -> None:
        with self._cv:
            job.finished = True
            self._running.pop(id(job), None)
            self.metrics.running.set(len(self._running))
