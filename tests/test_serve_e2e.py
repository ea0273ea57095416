"""End to end: `trimode serve --model bundled` as a subprocess on 127.0.0.1, driven by the real `openai`
client (chat and completions, streaming and not), then SIGINT: a clean exit (code 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimode.cli", "serve", "--model", "bundled", "--port", str(port),
         "--block-len", "4", "--threads", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() - t0 < 90, "server did not come up"
        time.sleep(0.2)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_openai_client(server):
    proc, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["bundled"]

    prompt = "def fibonacci(n):"
    c = client.completions.create(model="bundled", prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"decoding": {"mode": "ar"}})
    text = c.choices[0].text
    assert text and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens <= 24 and c.usage.model_extra["forwards"] >= 1
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="bundled", prompt=prompt, max_tokens=24, stream=True, extra_body={"decoding": {"mode": "ar"}}))
    assert streamed == text
    # speculative greedy decoding reproduces AR, through the whole stack
    lin = client.completions.create(model="bundled", prompt=prompt, max_tokens=24,
                                    extra_body={"decoding": {"mode": "linear", "block_len": 4}})
    assert lin.choices[0].text == text and lin.model_extra["decoding"]["mode"] == "linear"

    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    chat = client.chat.completions.create(model="bundled", messages=messages, max_tokens=20)
    reply = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and isinstance(reply, str)
    chunks = list(client.chat.completions.create(model="bundled", messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="bundled", prompt=prompt, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=prompt, max_tokens=2)
    metrics = httpx.get(url + "/metrics").text
    assert 'trimode_generations_total{mode="linear",reason=' in metrics

    # a client that disconnects mid-stream (or mid-request) frees its slot at the next cycle boundary
    body = {"model": "bundled", "prompt": prompt, "max_tokens": 900, "decoding": {"mode": "ar"}}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=1.0)
    t0 = time.time()
    while httpx.get(url + "/health").json()["running"]:
        assert time.time() - t0 < 10, "a disconnected client's row kept running"
        time.sleep(0.05)
    assert 'trimode_generations_total{mode="ar",reason="cancelled"} 2' in httpx.get(url + "/metrics").text

    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


def test_sigterm_drains_in_flight_requests_and_exits_0():
    """12 long requests in flight (6 streamed), SIGTERM after 1 s with a 3 s grace period: every one
    ends with a clean answer (a JSON 503 error, or an error event and [DONE] in a stream), none is cut
    off, /health says draining meanwhile, and the process exits 0 well before uvicorn's own limit."""
    import json
    import threading

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimode.cli", "serve", "--model", "bundled", "--port", str(port), "--threads", "1",
         "--shutdown-grace", "3"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 90, "server did not come up"
            time.sleep(0.2)
        body = {"prompt": "def fibonacci(n):", "max_tokens": 700, "decoding": {"mode": "ar"}}
        results: dict[int, tuple] = {}

        def plain(i):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            results[i] = ("plain", r.status_code, r.json())

        def streamed(i):
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                results[i] = ("stream", r.status_code, r.read().decode())

        threads = [threading.Thread(target=plain if i % 2 else streamed, args=(i,)) for i in range(12)]
        for th in threads:
            th.start()
        time.sleep(1.0)
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            h = httpx.get(url + "/health", timeout=2)
            assert h.status_code == 503 and h.json()["status"] == "draining", h.text
        except httpx.TransportError:
            pass  # uvicorn may already have closed the listening socket
        for th in threads:
            th.join(30)
        out, _ = proc.communicate(timeout=30)
        took = time.time() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert took < 8, took
    assert len(results) == 12
    for kind, status, payload in results.values():
        if kind == "plain":
            assert status == 503 and payload["error"]["code"] == "unavailable", payload
        else:
            assert status == 200 and payload.endswith("data: [DONE]\n\n"), payload[-300:]
            events = [json.loads(x[6:]) for x in payload.split("\n\n") if x.startswith("data: {")]
            assert events[-1]["error"]["code"] == "unavailable"
