"""The HTTP layer in-process (Starlette TestClient), over a model-free fake decoder with the bundled tokenizer:
schemas, SSE framing and [DONE], stream == non-stream, stop strings, 400 / 404 / 408 / 413 / 429, metrics,
the auto mode policy, cancellation."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from trimode.cli import BUNDLED  # noqa: E402
from trimode.serve.app import ServerSettings, create_app  # noqa: E402
from trimode.serve.cli import FALLBACK_CROSSOVER, read_crossover, read_serving  # noqa: E402
from trimode.serve.engine import Done, Engine, EngineConfig, Job  # noqa: E402
from trimode.serve.fake import fake_api, fake_model  # noqa: E402
from trimode.serve.text import TextStream  # noqa: E402
from trimode.tokenizer import load_tokenizer  # noqa: E402

TOK = load_tokenizer(BUNDLED)
MODES = ["ar", "linear", "quadratic", "diffusion"]


def make_client(*, gate=None, eos_every=0, engine_cfg=None, delay=0.0, **settings) -> TestClient:
    model = fake_model(TOK.vocab_size)
    engine = Engine(model, TOK, engine_cfg or EngineConfig(),
                    api=fake_api(TOK, gate=gate, eos_every=eos_every, delay=delay))
    base = {"model_name": "fake", "context": 1024, "vocab_size": TOK.vocab_size, "default_mode": "ar"}
    app = create_app(engine, TOK, ServerSettings(**{**base, **settings}))
    client = TestClient(app, raise_server_exceptions=False)
    client.engine = engine
    return client


@pytest.fixture(scope="module")
def client():
    with make_client() as c:
        yield c


def sse_events(resp) -> list:
    """Parse an SSE body strictly: every event is one `data: ...` line followed by a blank line."""
    body = resp.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    frames = body.split("\n\n")
    assert frames[-1] == ""
    out = []
    for f in frames[:-1]:
        assert f.startswith("data: ") and "\n" not in f, f
        payload = f[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return out[:-1]


def assert_error(resp, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return err


def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["id"] == "fake" and body["data"][0]["object"] == "model"
    assert client.get("/v1/models/fake").json()["id"] == "fake"
    assert_error(client.get("/v1/models/other"), 404)
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_completion_schema(client):
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "def f(x):", "max_tokens": 12})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "text_completion" and b["id"].startswith("cmpl-") and b["model"] == "fake"
    (choice,) = b["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] == "length"
    u = b["usage"]
    assert u["prompt_tokens"] == len(TOK.encode("def f(x):")) and u["completion_tokens"] == 12
    assert u["total_tokens"] == u["prompt_tokens"] + 12
    assert u["forwards"] >= 1 and u["tokens_per_forward"] == pytest.approx(12 / u["forwards"], abs=1e-3)
    assert b["decoding"]["mode"] == "ar"


def test_chat_schema(client):
    r = client.post("/v1/chat/completions", json={"model": "fake", "max_tokens": 5, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
    msg = b["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    prompt = TOK.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert b["usage"]["prompt_tokens"] == len(TOK.encode(prompt))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_non_stream(client, mode, chat):
    if chat:
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "write code"}]}
    else:
        url, body = "/v1/completions", {"prompt": "import os\n"}
    body = {**body, "max_tokens": 40, "decoding": {"mode": mode, "block_len": 4}}
    whole = client.post(url, json=body)
    assert whole.status_code == 200, whole.text
    r = client.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"] == whole.json()["usage"]
    chunks = events[:-1]
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        expect = whole.json()["choices"][0]["message"]["content"]
    else:
        assert all(c["object"] == "text_completion" for c in chunks)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        expect = whole.json()["choices"][0]["text"]
    assert text == expect and text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert whole.json()["decoding"]["mode"] == mode


def test_stream_without_usage_ends_with_finish(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
    events = sse_events(r)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-1]


def test_eos_finishes_with_stop():
    with make_client(eos_every=5) as c:
        r = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 100})
        b = r.json()
        assert b["choices"][0]["finish_reason"] == "stop" and b["usage"]["completion_tokens"] < 6


def test_stop_strings(client):
    full = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 60}).json()["choices"][0]["text"]
    stop = full[10:14]
    assert stop.strip() and full.find(stop) == 10
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 60, "stop": [stop, "@@never@@"],
                                                 "stream": stream})
        if stream:
            chunks = sse_events(r)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert text == full[:10] and finish == "stop"


def test_text_stream_holds_back_stop_prefixes():
    ids = TOK.encode("hello world, stop here please")
    full = TOK.decode(ids)
    ts = TextStream(TOK, ["stop here"])
    out = "".join(ts.feed([t]) for t in ids) + ts.finish()
    assert out == full[: full.index("stop here")] and ts.stopped
    ts = TextStream(TOK, ["please!"])  # a prefix appears at the end but never completes: all of it comes out
    out = "".join(ts.feed([t]) for t in ids) + ts.finish()
    assert out == full and not ts.stopped
    # multi-byte characters split across byte-level tokens never come out half-decoded
    ids = TOK.encode("€üñ")
    ts = TextStream(TOK)
    assert "".join(ts.feed([t]) for t in ids) + ts.finish() == "€üñ"


BAD = [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5.0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 3}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "decoding": {"mode": "fast"}}, "decoding.mode"),
    ({"prompt": "x", "decoding": {"block_len": 0}}, "decoding.block_len"),
    ({"prompt": "x", "decoding": {"block_len": 1000}}, "decoding.block_len"),
    ({"prompt": "x", "decoding": {"threshold": 1.5}}, "decoding.threshold"),
    ({"prompt": "x", "decoding": {"typo": 1}}, "decoding.typo"),
    ({"prompt": "x", "decoding": "ar"}, "decoding"),
    ({"prompt": "x" * 20000}, "prompt"),
    ({"prompt": list(range(5, 1100))}, "prompt"),
    ({"prompt": list(range(5, 600)), "max_tokens": 500}, "max_tokens"),
]
BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0.content"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_completion_requests(client, body, param):
    err = assert_error(client.post("/v1/completions", json=body), 400)
    assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_requests(client, body, param):
    err = assert_error(client.post("/v1/chat/completions", json=body), 400)
    assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("raw", [b"{", b"not json", b"[1, 2]", b'"x"', b"null", b'{"prompt": "\xff\xfe"}',
                                 b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", b"[" * 100000,
                                 b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "max_tokens": 1e400}',
                                 b'{"prompt": "\\ud800"}', b'{"prompt": "x", "stop": "\\udfff"}'])
def test_malformed_bodies(client, raw):
    assert_error(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)


def test_unknown_model_is_404(client):
    err = assert_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"


def test_body_limit():
    with make_client(max_body_bytes=1000) as c:
        assert_error(c.post("/v1/completions", json={"prompt": "x" * 2000}), 413)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_sampling_values(client, monkeypatch):
    for body in ({"temperature": 0}, {"temperature": 0.0, "top_p": 1}, {"seed": 7}, {"temperature": 0, "top_p": 0.5}):
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, **body})
        assert r.status_code == 200, r.text
    # the request carries SamplingParams to its row
    seen = []
    submit = client.engine.submit
    monkeypatch.setattr(client.engine, "submit", lambda job: (seen.append(job.sampling), submit(job)))
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9,
                                             "seed": -1})
    assert r.status_code == 200, r.text
    (sp,) = seen
    assert (sp.temperature, sp.top_p, sp.seed) == (0.7, 0.9, 2**63 - 1)
    err = assert_error(client.post("/v1/completions", json={"prompt": "x", "temperature": 0.7, "top_k": -1}), 400)
    assert err["param"] == "top_k"


def test_default_max_tokens_and_context():
    with make_client(default_max_tokens=7, context=64, max_tokens_limit=1024) as c:
        assert c.post("/v1/completions", json={"prompt": "x"}).json()["usage"]["completion_tokens"] == 7
        r = c.post("/v1/completions", json={"prompt": list(range(5, 60))})  # 55 tokens: room for 7 of 9
        assert r.json()["usage"]["completion_tokens"] == 7
        assert_error(c.post("/v1/completions", json={"prompt": list(range(5, 60)), "max_tokens": 10}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": list(range(5, 69))}), 400)


def wait_for(pred, timeout=5.0):
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.005)


def blocked_job(engine, events):
    return Job(prompt=[5, 6, 7], max_tokens=4, mode="ar", block_len=4, threshold=0.9, stop_ids=frozenset(),
               stops=[], sink=events.append)


def test_queue_full_is_429_then_recovers():
    gate = threading.Event()
    with make_client(gate=gate, engine_cfg=EngineConfig(max_running=1, max_queue=1)) as c:
        eng = c.engine
        ev1, ev2 = [], []
        eng.submit(blocked_job(eng, ev1))
        wait_for(lambda: eng.snapshot()["running"] == 1)  # admitted, its decoder now waits on the gate
        eng.submit(blocked_job(eng, ev2))  # the one queue slot
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        err = assert_error(r, 429)
        assert r.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
        assert 'trimode_rejected_total{reason="queue_full"} 1' in c.get("/metrics").text
        assert c.get("/health").json()["queued"] == 1
        gate.set()
        wait_for(lambda: ev2 and isinstance(ev2[-1], Done))
        assert isinstance(ev1[-1], Done) and ev1[-1].usage["completion_tokens"] == 4
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_cancel_frees_slot_and_timeout_is_408():
    gate = threading.Event()
    with make_client(gate=gate, request_timeout=0.3, engine_cfg=EngineConfig(max_running=1, max_queue=4)) as c:
        eng = c.engine
        queued_ev, run_ev = [], []
        running = blocked_job(eng, run_ev)
        eng.submit(running)
        wait_for(lambda: eng.snapshot()["running"] == 1)
        queued = blocked_job(eng, queued_ev)
        eng.submit(queued)
        eng.cancel(queued)  # a queued job leaves the queue at once
        assert eng.snapshot()["queued"] == 0
        eng.cancel(running)  # a running one frees its slot at the next boundary (the worker is blocked in cycle)
        err = assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 408)
        assert err["code"] == "timeout"
        gate.set()
        wait_for(lambda: eng.snapshot()["running"] == 0)
        assert run_ev[-1] == Done("cancelled", run_ev[-1].usage) and not queued_ev
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_timeout_inside_a_stream_is_an_error_event():
    gate = threading.Event()
    with make_client(gate=gate, request_timeout=0.3) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
        events = sse_events(r)
        assert events[-1]["error"]["code"] == "timeout"
        gate.set()


@pytest.mark.parametrize("crossover,expect", [(0, "ar"), (8, "linear")])
def test_auto_policy(crossover, expect):
    cfg = EngineConfig(auto_crossover=crossover, spec_mode="linear")
    with make_client(engine_cfg=cfg, default_mode="auto") as c:
        b = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).json()
        assert b["decoding"]["mode"] == expect and b["decoding"]["requested"] == "auto"
        text = c.get("/metrics").text
        assert f'trimode_mode_decisions_total{{mode="{expect}",requested="auto"}} 1' in text


def test_auto_switches_to_ar_under_load():
    gate = threading.Event()
    cfg = EngineConfig(auto_crossover=2, max_running=8)
    with make_client(gate=gate, engine_cfg=cfg, default_mode="auto") as c:
        eng = c.engine
        evs = [[] for _ in range(4)]
        for e in evs:
            job = blocked_job(eng, e)
            job.mode = "auto"
            eng.submit(job)
            time.sleep(0.05)
        gate.set()
        wait_for(lambda: all(e and isinstance(e[-1], Done) for e in evs))
        # the first is admitted alone (load 1); the worker then waits in its cycle, so the other three are
        # admitted together with 1 running + 3 new = 4 > 2 in the system
        assert [e[0].info["mode"] for e in evs] == ["linear", "ar", "ar", "ar"]


def test_metrics_text(client):
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "decoding": {"mode": "linear"}})
    text = client.get("/metrics").text
    for name in ("trimode_requests_total", "trimode_generated_tokens_total", "trimode_forwards_total",
                 "trimode_tokens_per_forward_bucket", "trimode_acceptance_length_bucket", "trimode_queue_depth",
                 "trimode_running_requests", "trimode_mode_decisions_total", "trimode_time_to_first_token"):
        assert name in text, name
    assert 'trimode_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'trimode_forwards_total{kind="verify",mode="linear"}' in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value.replace("+Inf", "inf"))


def test_read_crossover(tmp_path):
    assert read_crossover(tmp_path) == (FALLBACK_CROSSOVER, "fallback (no serving.json)")
    (tmp_path / "serving.json").write_text('{"auto_crossover": 12}')
    assert read_crossover(tmp_path)[0] == 12
    # as `trimode bench --sweep --write-crossover` writes it: the spec config the crossover was measured with
    (tmp_path / "serving.json").write_text(json.dumps({"auto_crossover": 3, "speculative_mode": "quadratic",
                                                       "block_len": 6, "device": "cpu"}))
    assert read_serving(tmp_path)[0] == {"auto_crossover": 3, "speculative_mode": "quadratic", "block_len": 6}
    for bad in ('{"auto_crossover": -1}', '{"auto_crossover": "4"}', "{}", "not json"):
        (tmp_path / "serving.json").write_text(bad)
        with pytest.raises(ValueError):
            read_crossover(tmp_path)


def test_decoder_failure_is_contained(monkeypatch):
    """A decoder that raises answers its requests with a 500 (a bug, not the client's fault); other decoders
    and the worker carry on."""
    from trimode.serve import fake

    cycle = fake.FakeDecoder.cycle

    def failing(self):
        if self.mode == "quadratic":
            raise RuntimeError("boom")
        return cycle(self)

    monkeypatch.setattr(fake.FakeDecoder, "cycle", failing)
    with make_client() as c:
        err = assert_error(c.post("/v1/completions", json={"prompt": "x", "decoding": {"mode": "quadratic"}}), 500)
        assert err["type"] == "server_error" and err["code"] == "decoder_error"
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200
        assert c.get("/health").json()["status"] == "ok" and c.engine.errors == 1


def test_row_refused_by_the_decoder_api_is_400():
    """A ValueError from Row(...) or admit() is the request's fault: a 400, and the worker lives on."""
    from trimode.serve.fake import FakeRow

    class PickyRow(FakeRow):
        def __init__(self, prompt, **kw):
            if prompt[0] == 5:
                raise ValueError("row refused: prompt starts with 5")
            super().__init__(prompt, **kw)

    make_decoder, _ = fake_api(TOK)
    engine = Engine(fake_model(TOK.vocab_size), TOK, EngineConfig(), api=(make_decoder, PickyRow))
    app = create_app(engine, TOK, ServerSettings(model_name="fake", context=1024, vocab_size=TOK.vocab_size))
    with TestClient(app) as c:
        err = assert_error(c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}), 400)
        assert "row refused" in err["message"]
        assert c.post("/v1/completions", json={"prompt": [6, 5], "max_tokens": 2}).status_code == 200
        # The worker drops the finished row just after the last token is delivered: poll briefly.
        deadline = time.monotonic() + 10
        while True:
            h = c.get("/health").json()
            if (h["queued"], h["running"]) == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert (h["status"], h["queued"], h["running"]) == ("ok", 0, 0)
