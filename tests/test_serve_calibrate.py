"""The server's default cycle budget is a cost measured at start-up: the widest forward that costs at
most --max-cycle-cost AR steps on this model and machine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trimode.serve import calibrate


def fake_model(max_seq_len: int = 4096):
    return SimpleNamespace(config=SimpleNamespace(max_seq_len=max_seq_len))


@pytest.mark.parametrize("slope,expect", [(1 / 32, 160), (1 / 512, 2048), (1.0, 5)])
def test_the_budget_is_the_widest_forward_within_the_cost(monkeypatch, slope, expect):
    # cost(w) = 1 + slope * (w - 1) AR steps: linear, as a forward's cost is beyond the memory-bound region
    monkeypatch.setattr(calibrate, "forward_seconds", lambda model, w, **kw: 0.01 * (1 + slope * (w - 1)))
    width, info = calibrate.max_cycle_tokens(fake_model(), 6.0)
    assert abs(width - expect) <= 1, (width, info)
    assert all(c <= 6.0 for w, c in info["cost_in_ar_steps"].items() if w <= width)


def test_the_budget_never_refuses_the_servers_own_defaults(monkeypatch):
    monkeypatch.setattr(calibrate, "forward_seconds", lambda model, w, **kw: 0.01 * w)  # every token costs
    width, _ = calibrate.max_cycle_tokens(fake_model(), 6.0, floor=20)
    assert width == 20


def test_the_budget_stays_within_the_context(monkeypatch):
    monkeypatch.setattr(calibrate, "forward_seconds", lambda model, w, **kw: 0.01)  # free
    width, _ = calibrate.max_cycle_tokens(fake_model(max_seq_len=300), 6.0)
    assert width <= 300 - calibrate.CONTEXT - 1


def test_measured_on_the_bundled_model():
    from trimode.checkpoint import load_model
    from trimode.models import for_inference, resolve_model

    m = for_inference(load_model(resolve_model("bundled")))
    width, info = calibrate.max_cycle_tokens(m, 6.0)
    assert width >= 8 and info["ar_step_ms"] > 0 and 8 in info["cost_in_ar_steps"]
