"""Fuzz + load run of `trimode serve` over real sockets (a subprocess serving the bundled model).

Five checks, each printed with its numbers, all written to --out as JSON:

1. fuzz: N malformed requests (default 10,000) from a seeded generator, sent by 32 concurrent clients:
   random bytes, truncated / corrupted JSON, every field of a valid request replaced by a hostile value,
   wrong methods and routes, bad Content-Type / Content-Length / Host, protocol garbage written to the
   socket (bad request lines, oversized headers, bare LF, chunked bodies with bad sizes). Pass: 0 answers
   >= 500, every app-level error OpenAI-shaped, and /health idle and ok at the end.
2. concurrency: 64 concurrent streams in mixed modes (ar, linear, quadratic, diffusion; greedy), each
   compared with the same request run alone. Pass: all identical.
3. fairness: p99 latency of light requests (8 AR tokens) on an idle server vs beside a heavy one
   (quadratic, the widest block the cycle budget admits, 512 tokens). Pass: p99 within 3x.
4. idle connections: 1,000 open idle sockets (a third mid-headers); /health timed. Pass: < 1 s.
5. SIGTERM with 12 requests in flight (max_tokens 700, half streamed): every request completes or ends
   with a clean error (a JSON 503, or an error event and [DONE] in a stream); exit code 0.

    python scripts/serve_torture.py --out docs/serve-torture.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ["/v1/completions", "/v1/chat/completions"]
MODES = ["ar", "linear", "quadratic", "diffusion"]
HOSTILE = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**400, 1e308, -1e308, 0.5, "", "x" * 5000,
           "\ud800", "\x00", [], [1], [[]], {}, {"a": 1}, [None] * 50, "ar", "quadratic", "🙂" * 100,
           [{"role": "system"}], [{"role": "user", "content": None}], [{"role": "tool", "content": "x"}],
           [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
           {"mode": "quadratic", "block_len": 10**6}, {"mode": "diffusion", "threshold": -3},
           {"mode": "linear", "block_len": 0}, {"mode": "nope"}]
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n",
          "decoding", "logprobs", "echo", "stream_options", "presence_penalty", "logit_bias", "user", "suffix"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "trimode.cli", "serve", "--model", "bundled", "--port", str(port),
                             "--threads", "1", "--max-queue", "1024", *extra],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < 120:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not come up")


# -- 1. fuzz --------------------------------------------------------------------------------------------
def valid_request(rng: random.Random, route: str) -> dict:
    body = {"max_tokens": rng.choice([1, 2, 4, 8]), "decoding": {"mode": rng.choice(MODES), "block_len": 4}}
    if route.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": rng.choice(["hi", "add two numbers", "x" * 40])}]
    else:
        body["prompt"] = rng.choice(["def f(x):", "import os\n", "a"])
    return body


def http_request(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def fuzz_case(rng: random.Random) -> tuple[str, bytes]:
    """(kind, raw bytes of one HTTP exchange's request)."""
    route = rng.choice(ROUTES)
    base = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close"}
    k = rng.randrange(12)
    if k == 0:  # random bytes as a body
        body = rng.randbytes(rng.randrange(0, 2000))
        return "random-body", http_request("POST", route, body, {**base, "Content-Length": str(len(body))})
    if k in (1, 2, 3):  # one field replaced by a hostile value (the rest valid)
        req = valid_request(rng, route)
        req[rng.choice(FIELDS)] = rng.choice(HOSTILE)
        body = json.dumps(req, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        return "mutated-field", http_request("POST", route, body, {**base, "Content-Length": str(len(body))})
    if k == 4:  # valid JSON, corrupted: truncated, a byte flipped, invalid UTF-8, NaN, deep nesting
        body = json.dumps(valid_request(rng, route)).encode()
        c = rng.randrange(5)
        if c == 0:
            body = body[:rng.randrange(len(body))]
        elif c == 1:
            i = rng.randrange(len(body))
            body = body[:i] + bytes([rng.randrange(256)]) + body[i + 1:]
        elif c == 2:
            body = body.replace(b'"max_tokens"', b'"max_\xff\xfetokens"')
        elif c == 3:
            body = body.replace(b'"max_tokens": ', b'"temperature": NaN, "max_tokens": ')
        else:
            depth = rng.choice([100, 10_000, 100_000])
            body = b'{"decoding": ' + b"[" * depth + b"]" * depth + b"}"
        return "corrupt-json", http_request("POST", route, body, {**base, "Content-Length": str(len(body))})
    if k == 5:  # wrong route or method
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"])
        path = rng.choice(["/", "/v1", "/v1/models/../../etc/passwd", "/v1/completions/x", "/%ff", "/health?x=%zz",
                           "/v1/models/" + "a" * 3000, "/metrics", "/v1/chat/completions"])
        return "route-method", http_request(method, path, b"", {**base, "Content-Length": "0"})
    if k == 6:  # bad headers around a valid body
        body = json.dumps(valid_request(rng, route)).encode()
        h = dict(base, **{"Content-Length": str(len(body))})
        c = rng.randrange(6)
        if c == 0:
            h["Content-Type"] = rng.choice(["text/plain", "", "application/x-www-form-urlencoded", "json"])
        elif c == 1:
            h["Content-Length"] = rng.choice(["-1", "abc", str(len(body) + 50), "1e3", " 12"])
        elif c == 2:
            h["Host"] = rng.choice(["evil.example", "", "127.0.0.1.nip.io", "[::1", "a" * 300])
        elif c == 3:
            h["Authorization"] = "Bearer " + "x" * rng.randrange(5000)
        elif c == 4:
            h["Content-Length"] = str(10**7)
        else:
            h["Transfer-Encoding"] = "chunked"
        return "bad-headers", http_request("POST", route, body, h)
    if k == 7:  # chunked bodies, some with bad chunk sizes
        body = json.dumps(valid_request(rng, route)).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
        if rng.random() < 0.5:
            chunks = chunks.replace(b"7\r\n", b"zz\r\n", 1)
        return "chunked", http_request("POST", route, chunks + b"0\r\n\r\n",
                                       {**base, "Transfer-Encoding": "chunked"})
    if k == 8:  # protocol garbage
        return "protocol", rng.choice([
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),  # a TLS hello
            b"GET / HTTP/9.9\r\n\r\n", b"GARBAGE\r\n\r\n", b"GET /health\n\n", b"\r\n\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n", rng.randbytes(300)])
    if k == 9:  # random JSON values as the whole body
        body = json.dumps(rng.choice(HOSTILE + [[valid_request(rng, route)], "null", 3])).encode(
            "utf-8", "surrogatepass")
        return "json-value", http_request("POST", route, body, {**base, "Content-Length": str(len(body))})
    if k == 10:  # a valid request that asks too much
        req = valid_request(rng, route)
        req.update(rng.choice([{"max_tokens": 10**6}, {"decoding": {"mode": "quadratic", "block_len": 64}},
                               {"prompt": "x " * 50_000}, {"n": 1000}, {"stop": ["a"] * 1000},
                               {"decoding": {"mode": "diffusion", "threshold": rng.random()}}]))
        body = json.dumps(req).encode()
        return "too-much", http_request("POST", route, body, {**base, "Content-Length": str(len(body))})
    # k == 11: a streamed valid request (must end with [DONE])
    req = valid_request(rng, route)
    req["stream"] = True
    body = json.dumps(req).encode()
    return "stream", http_request("POST", route, body, {**base, "Content-Length": str(len(body))})


async def exchange(port: int, raw: bytes, timeout: float = 60.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        try:
            writer.write_eof()
        except OSError:
            pass
        return await asyncio.wait_for(reader.read(), timeout)
    except (ConnectionError, OSError):
        return b""
    finally:
        writer.close()


def judge(reply: bytes, raw: bytes) -> tuple[int | None, str | None]:
    """(status, problem or None) for the reply to the request `raw`."""
    if not reply:
        return None, None  # the server closed the connection (protocol garbage): fine
    try:
        status = int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, f"not HTTP: {reply[:60]!r}"
    if status >= 500:
        return status, f"{status}: {reply[:300]!r}"
    head, _, body = reply.partition(b"\r\n\r\n")
    if 400 <= status < 500 and b"application/json" in head.lower() and not raw.startswith(b"HEAD "):
        try:
            err = json.loads(body)["error"]
            assert set(err) == {"message", "type", "param", "code"}
        except Exception:  # noqa: BLE001
            return status, f"{status} not OpenAI-shaped: {body[:200]!r}"
    if status == 200 and b"text/event-stream" in head.lower() and not body.rstrip().endswith(b"[DONE]"):
        return status, "stream without [DONE]"
    return status, None


async def fuzz(port: int, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    cases = [fuzz_case(rng) for _ in range(n)]
    statuses: dict[str, int] = {}
    problems: list[str] = []
    sem = asyncio.Semaphore(32)

    async def one(kind: str, raw: bytes) -> None:
        async with sem:
            status, problem = judge(await exchange(port, raw), raw)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if problem:
            problems.append(f"{kind}: {problem}")

    t0 = time.time()
    await asyncio.gather(*(one(k, r) for k, r in cases))
    async with httpx.AsyncClient() as c:
        health = (await c.get(f"http://127.0.0.1:{port}/health")).json()
    five = sum(v for k, v in statuses.items() if k != "None" and int(k) >= 500)
    return {"requests": n, "seconds": round(time.time() - t0, 1), "statuses": dict(sorted(statuses.items())),
            "5xx": five, "problems": problems[:20], "n_problems": len(problems), "health_after": health,
            "pass": five == 0 and not problems and health.get("status") == "ok" and health.get("running") == 0}


# -- 2. concurrency -----------------------------------------------------------------------------------
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:", "# add two numbers\n",
           "for i in range(10):", "def is_prime(n):", "x = [", "The quick brown fox"]


async def complete(c: httpx.AsyncClient, url: str, body: dict, stream: bool) -> tuple[str, float]:
    t0 = time.perf_counter()
    if not stream:
        r = await c.post(url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return r.json()["choices"][0]["text"], time.perf_counter() - t0
    text = ""
    async with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=300) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if "error" in ev:
                    raise RuntimeError(ev["error"])
                text += ev["choices"][0]["text"]
    return text, time.perf_counter() - t0


async def concurrency(url: str, n: int = 64) -> dict:
    reqs = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "temperature": 0,
             "decoding": {"mode": MODES[i % 4], "block_len": 4}} for i in range(n)]
    async with httpx.AsyncClient() as c:
        alone = [(await complete(c, url, r, stream=False))[0] for r in reqs]
        t0 = time.time()
        together = await asyncio.gather(*(complete(c, url, r, stream=True) for r in reqs))
    same = [a == t for a, (t, _) in zip(alone, together)]
    return {"streams": n, "identical": sum(same), "modes": MODES, "seconds_together": round(time.time() - t0, 1),
            "mismatches": [i for i, s in enumerate(same) if not s], "pass": all(same)}


# -- 3. fairness ----------------------------------------------------------------------------------------
async def light_latencies(c: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        _, dt = await complete(c, url, {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8,
                                        "decoding": {"mode": "ar"}}, stream=False)
        out.append(dt)
    return out


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


async def fairness(url: str, n: int = 60) -> dict:
    async with httpx.AsyncClient() as c:
        await light_latencies(c, url, 5)  # warm up
        idle = await light_latencies(c, url, n)
        # The heavy request: quadratic at the widest block the server's cycle budget admits.
        for k in range(31, 1, -1):
            heavy = {"prompt": "import os\nimport sys\n", "max_tokens": 512, "temperature": 0,
                     "decoding": {"mode": "quadratic", "block_len": k}}
            probe = await c.post(url + "/v1/completions", json={**heavy, "max_tokens": 1}, timeout=60)
            if probe.status_code == 200:
                break
        task = asyncio.ensure_future(complete(c, url, heavy, stream=False))
        await asyncio.sleep(1.0)
        busy = await light_latencies(c, url, n)
        heavy_running = not task.done()
        await task
    ratio = p99(busy) / p99(idle)
    return {"light_requests": n, "p99_idle_s": round(p99(idle), 4), "p99_beside_heavy_s": round(p99(busy), 4),
            "median_idle_s": round(statistics.median(idle), 4),
            "median_beside_heavy_s": round(statistics.median(busy), 4),
            "ratio": round(ratio, 2), "heavy_block_len": k, "heavy_tokens_per_forward": k * (k + 1),
            "heavy_still_running_at_end": heavy_running, "pass": ratio <= 3.0}


# -- 4. idle connections --------------------------------------------------------------------------------
def idle_connections(port: int, n: int = 1000) -> dict:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 3 == 0:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ")
        socks.append(s)
    time.sleep(0.5)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    for s in socks:
        s.close()
    return {"idle_connections": n, "health_seconds": [round(t, 4) for t in times], "pass": max(times) < 1.0}


# -- 5. SIGTERM with 12 in flight -----------------------------------------------------------------------
async def sigterm(log: Path) -> dict:
    port = free_port()
    proc = start_server(port, log, ["--shutdown-grace", "10"])
    url = f"http://127.0.0.1:{port}"
    outcomes: list[str] = []

    async def one(i: int, c: httpx.AsyncClient) -> None:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 700, "decoding": {"mode": MODES[i % 4]}}
        try:
            if i % 2:
                r = await c.post(url + "/v1/completions", json=body, timeout=120)
                if r.status_code == 200:
                    outcomes.append("completed")
                elif r.status_code == 503 and r.json()["error"]:
                    outcomes.append("clean 503")
                else:
                    outcomes.append(f"bad {r.status_code} {r.text[:80]}")
            else:
                lines = []
                async with c.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                                    timeout=120) as r:
                    async for line in r.aiter_lines():
                        if line:
                            lines.append(line)
                err = any('"error"' in x for x in lines)
                done = bool(lines) and lines[-1] == "data: [DONE]"
                outcomes.append(("stream error event + [DONE]" if err else "stream completed") if done
                                else f"bad stream ending {lines[-1:]}")
        except httpx.HTTPError as e:
            outcomes.append(f"bad {type(e).__name__}")

    async with httpx.AsyncClient() as c:
        tasks = [asyncio.ensure_future(one(i, c)) for i in range(12)]
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        await asyncio.gather(*tasks)
    code = proc.wait(timeout=60)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return {"in_flight": 12, "outcomes": counts, "exit_code": code, "seconds_to_exit": round(time.time() - t0, 1),
            "pass": code == 0 and all(not o.startswith("bad") for o in outcomes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="malformed requests in the fuzz check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp") / "trimode-torture")
    args = ap.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    port = free_port()
    proc = start_server(port, args.log_dir / "server.log", [])
    url = f"http://127.0.0.1:{port}"
    results = {"load_average_at_start": [round(x, 2) for x in load]}
    try:
        for name, run in [("fuzz", lambda: asyncio.run(fuzz(port, args.requests, args.seed))),
                          ("concurrency", lambda: asyncio.run(concurrency(url))),
                          ("fairness", lambda: asyncio.run(fairness(url))),
                          ("idle_connections", lambda: idle_connections(port))]:
            t0 = time.time()
            results[name] = run()
            print(f"{name} ({time.time() - t0:.0f} s): {json.dumps(results[name])}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log_lines = (args.log_dir / "server.log").read_text().count("\n")
    results["server_log_lines"] = log_lines
    results["sigterm"] = asyncio.run(sigterm(args.log_dir / "sigterm.log"))
    print(f"sigterm: {json.dumps(results['sigterm'])}", flush=True)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ok = all(results[k]["pass"] for k in ("fuzz", "concurrency", "fairness", "idle_connections", "sigterm"))
    results["pass"] = ok
    print(f"server log: {log_lines} lines; all checks {'passed' if ok else 'FAILED'}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
