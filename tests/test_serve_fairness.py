"""One request cannot stall the others: a per-request forward-width limit, a per-decoder cycle-token
budget, a cap on distinct decoding configs, and a time-fair choice of which decoder runs next."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")

from test_serve import TOK, assert_error, make_client, wait_for  # noqa: E402

from trimode.serve.engine import Done, EngineConfig, Job, forward_width  # noqa: E402


def job(mode: str, events: list, *, max_tokens: int = 8, block_len: int = 4, threshold: float = 0.9) -> Job:
    return Job(prompt=TOK.encode("def f(x):"), max_tokens=max_tokens, mode=mode, block_len=block_len,
               threshold=threshold, stop_ids=frozenset(), stops=[], sink=events.append)


def test_forward_width_and_the_per_request_limit():
    assert [forward_width(m, 8) for m in ("ar", "linear", "diffusion", "quadratic")] == [1, 8, 8, 72]
    with make_client(engine_cfg=EngineConfig(max_cycle_tokens=1024)) as c:
        body = {"prompt": "x", "max_tokens": 2, "decoding": {"mode": "quadratic", "block_len": 64}}
        err = assert_error(c.post("/v1/completions", json=body), 400)
        assert err["param"] == "decoding.block_len" and "4160 tokens" in err["message"]
        for mode, k in (("quadratic", 31), ("linear", 64), ("diffusion", 64)):
            body = {"prompt": "x", "max_tokens": 2, "decoding": {"mode": mode, "block_len": k}}
            assert c.post("/v1/completions", json=body).status_code == 200, (mode, k)


def test_a_cheap_decoder_is_not_held_to_an_expensive_ones_pace():
    """Round robin would give the 8-token AR request one cycle per 0.15 s quadratic cycle (>= 1.2 s);
    a time share lets it run all its cheap cycles after at most one expensive one."""
    with make_client(delay={"quadratic": 0.15}, default_mode="ar") as c:
        eng = c.engine
        heavy, light = [], []
        big = job("quadratic", heavy, max_tokens=400)
        eng.submit(big)
        wait_for(lambda: eng.snapshot()["running"] == 1)
        t0 = time.perf_counter()
        eng.submit(job("ar", light, max_tokens=8))
        wait_for(lambda: light and isinstance(light[-1], Done), timeout=10)
        took = time.perf_counter() - t0
        assert took < 0.6, took
        assert not (heavy and isinstance(heavy[-1], Done))  # the heavy one is still going: it was not starved
        eng.cancel(big)


def test_cycle_token_budget_and_decoder_cap_queue_the_rest():
    gate = threading.Event()
    cfg = EngineConfig(max_cycle_tokens=40, max_decoders=2, max_running=16)
    with make_client(gate=gate, engine_cfg=cfg) as c:
        eng = c.engine
        quad = [[] for _ in range(5)]  # width 20 each: two fit in a 40-token cycle
        for e in quad:
            eng.submit(job("quadratic", e, block_len=4))
        wait_for(lambda: eng.snapshot()["running"] == 2)
        time.sleep(0.1)
        assert eng.snapshot() == {"queued": 3, "running": 2, "decoders": 1}
        diff = [[] for _ in range(3)]  # three more configs: only one more decoder may start
        for i, e in enumerate(diff):
            eng.submit(job("diffusion", e, threshold=0.5 + 0.1 * i))
        time.sleep(0.1)
        assert eng.snapshot()["decoders"] <= 2
        gate.set()
        wait_for(lambda: all(e and isinstance(e[-1], Done) for e in quad + diff), timeout=20)
        assert all(e[-1].usage["completion_tokens"] == 8 for e in quad + diff)


def test_a_new_light_request_runs_to_the_end_before_the_wide_one_goes_again():
    """A decoder that arrives beside a long-running wide one gets a credit of one of its cycles: the
    8-token AR request runs all its cycles back to back (forwards cannot be interrupted, so only the
    cycle in progress when it arrived delays it). Without the credit the wide decoder would run again
    right after the light one's first cycle."""
    with make_client(delay={"quadratic": 0.2, "ar": 0.005}, default_mode="ar") as c:
        eng = c.engine
        heavy: list = []
        big = job("quadratic", heavy, max_tokens=400)
        eng.submit(big)
        wait_for(lambda: big.row is not None and len(big.row.trace) >= 2)  # a wide cycle time on record
        seen: list[int] = []  # the wide row's cycle count at each event of the light request
        light = job("ar", [], max_tokens=8)
        light.sink = lambda ev: seen.append((len(big.row.trace), ev))
        eng.submit(light)
        wait_for(lambda: seen and isinstance(seen[-1][1], Done), timeout=10)
        counts = [n for n, ev in seen if not isinstance(ev, Done)]
        assert len(light.row.tokens) == 8
        assert max(counts) - min(counts) == 0, counts
        eng.cancel(big)
