"""Limits before a request is read, on a real `trimode serve` subprocess (uvicorn + our h11 protocol):
idle / slow-header connections are closed after --header-timeout, a stalled upload gets an
OpenAI-shaped 408 after --body-timeout, idle connections beyond --max-connections are evicted oldest
first (so /health still answers), and a client leaving mid-upload logs nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trimode.cli", "serve", "--model", "bundled", "--port", str(port),
             "--fake-decoder", "--threads", "1", "--header-timeout", "1", "--body-timeout", "1.5",
             "--max-connections", "8"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() - t0 < 90, "server did not come up"
        time.sleep(0.2)
    yield port, url, log
    proc.kill()
    proc.wait()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(4096)
        except (TimeoutError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server):
    port, _, _ = server
    s = connect(port)
    t0 = time.monotonic()
    assert read_all(s) == b""  # closed, without an answer: it never asked anything
    assert 0.8 < time.monotonic() - t0 < 5


def test_slow_headers_get_408_after_the_header_timeout(server):
    port, _, _ = server
    s = connect(port)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    t0 = time.monotonic()
    for _ in range(8):  # a header line every 0.3 s: each byte on time, the whole never finishes
        time.sleep(0.3)
        try:
            s.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 5


def test_a_stalled_body_gets_an_openai_shaped_408(server):
    port, _, _ = server
    s = connect(port)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\": \"he")
    t0 = time.monotonic()
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 1.2 < time.monotonic() - t0 < 6


def test_idle_connections_beyond_the_cap_are_evicted_so_health_answers(server):
    port, url, _ = server
    idle = [connect(port) for _ in range(30)]  # --max-connections 8
    for s in idle[::2]:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: loc")  # half of them mid-headers
    time.sleep(0.2)
    t0 = time.monotonic()
    r = httpx.get(url + "/health", timeout=5)
    assert r.status_code == 200 and time.monotonic() - t0 < 1.0
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=10)
    assert r.status_code == 200
    for s in idle:
        s.close()


def test_a_client_leaving_mid_upload_logs_nothing(server):
    port, url, log = server
    before = log.read_text().count("\n")
    for _ in range(5):
        s = connect(port)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"x" * 5000)
        time.sleep(0.1)
        s.close()
    time.sleep(0.5)
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    text = log.read_text()
    assert text.count("\n") == before, text[-2000:]


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                                 b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                                 b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"])
def test_protocol_errors_are_openai_shaped(server, raw):
    port, _, _ = server
    s = connect(port)
    s.sendall(raw)
    reply = read_all(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), reply[:200]
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
