"""Loopback load test of `trimode serve`: concurrent streaming greedy clients, per decoding mode.

Starts `trimode serve --model MODEL` on 127.0.0.1 (a free port; or use --url for a running server), then
for each mode (ar, linear, auto) and each concurrency (1, 4, 16, 64) sends the same N prompts as
streaming completions with that many in flight. The concurrency-1 run serves every request alone: its
texts are the reference, and every batched response must equal it (batching changes no token). Any
5xx, any mismatch, or running past --time-limit fails the run (exit code 1). Prints a markdown table
(requests/s, tokens/s, time to first token, per-token latency p50/p99) and ends with one JSON line.

    python scripts/loadtest.py --model bundled --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ["def ", "class ", "import ", "    def ", "    return ", "for ", "if ", "with open(", "try:\n    ",
         "# ", "from ", "    self."]
NAMES = ["parse", "load", "read_file", "Stack", "Queue", "fibonacci", "is_prime", "merge", "walk", "split_path",
         "format_date", "encode", "decode", "Config", "main", "run"]


def prompts(n: int) -> list[str]:
    """n distinct, code-like prompts (deterministic)."""
    return [f"{SEEDS[i % len(SEEDS)]}{NAMES[(i * 7) % len(NAMES)]}{'_' + str(i) if i >= 16 else ''}"
            for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, mode: str, max_tokens: int,
              block_len: int | None) -> dict:
    decoding = {"mode": mode} | ({"block_len": block_len} if block_len else {})
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "decoding": decoding}
    t0 = time.perf_counter()
    first = last = None
    parts, usage, info, finish = [], None, None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "error": r.text[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                return {"status": 599, "error": ev["error"]["message"]}
            if ev.get("usage"):
                usage, info = ev["usage"], ev.get("decoding")
                continue
            ch = ev["choices"][0]
            if ch["text"]:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                parts.append(ch["text"])
            finish = ch["finish_reason"] or finish
    t1 = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    return {"status": 200, "text": "".join(parts), "finish": finish, "tokens": n, "start": t0, "end": t1,
            "ttft": (first if first is not None else t1) - t0,
            "tpot": (last - first) / (n - 1) if first is not None and n > 1 else None,
            "forwards": usage["forwards"] if usage else 0, "mode": (info or {}).get("mode")}


async def phase(url: str, model: str, texts: list[str], mode: str, conc: int, max_tokens: int,
                block_len: int | None, deadline: float) -> dict:
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        sem = asyncio.Semaphore(conc)
        results: list[dict | None] = [None] * len(texts)

        async def worker(i: int) -> None:
            async with sem:
                results[i] = await one(client, url, model, texts[i], mode, max_tokens, block_len)

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(len(texts)))),
                               timeout=max(1.0, deadline - time.time()))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r and r["status"] == 200]
    return {
        "mode": mode, "concurrency": conc, "requests": len(texts), "ok": len(ok), "wall_s": wall,
        "status": sorted({r["status"] for r in results if r}),
        "n5xx": sum(1 for r in results if r and r["status"] >= 500),
        "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
        "tpot_p50": pct([r["tpot"] for r in ok if r["tpot"] is not None], 50),
        "tpot_p99": pct([r["tpot"] for r in ok if r["tpot"] is not None], 99),
        "tokens_per_forward": sum(r["tokens"] for r in ok) / max(1, sum(r["forwards"] for r in ok)),
        "chosen": sorted({r["mode"] for r in ok if r["mode"]}),
        "texts": [r["text"] if r and r["status"] == 200 else None for r in results],
        "errors": [r["error"] for r in results if r and r["status"] != 200][:3],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "trimode.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-running", str(max(args.concurrency)), "--log-level", "error"] + args.server_arg
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() - t0 > 120:
            proc.kill()
            raise SystemExit("server did not come up in 120 s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--served-model-name", default=None, help="default: the model directory's name")
    p.add_argument("--modes", default="ar,linear,auto")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=64, help="requests per (mode, concurrency) run")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--block-len", type=int, default=None, help="decoding.block_len (default: the server's)")
    p.add_argument("--time-limit", type=float, default=1200.0, help="seconds for the whole run")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for trimode serve (repeatable)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    deadline = time.time() + args.time_limit
    texts = prompts(args.requests)
    model = args.served_model_name or ("bundled" if args.model == "bundled" else Path(args.model).name)
    proc = None
    if args.url is None:
        proc, url = start_server(args)
    else:
        url = args.url.rstrip("/")
    rows, failures = [], []
    try:
        asyncio.run(phase(url, model, texts[:2], "ar", 2, 4, None, deadline))  # warm-up
        for mode in modes:
            ref = None
            for conc in args.concurrency:
                r = asyncio.run(phase(url, model, texts, mode, conc, args.max_tokens, args.block_len, deadline))
                if ref is None:
                    ref = r["texts"]  # the first concurrency (1): every request served alone
                r["identical"] = sum(a == b and a is not None for a, b in zip(r["texts"], ref))
                if r["n5xx"] or r["ok"] != r["requests"] or r["identical"] != r["requests"]:
                    failures.append(f"{mode}@{conc}: ok {r['ok']}/{r['requests']}, identical {r['identical']}, "
                                    f"5xx {r['n5xx']}, status {r['status']}, errors {r['errors']}")
                rows.append(r)
                print(f"{mode:>7} x{conc:<3} {r['req_per_s']:7.2f} req/s {r['tok_per_s']:8.1f} tok/s  "
                      f"ttft p50 {r['ttft_p50'] * 1e3:7.1f} ms  tpot p50 {r['tpot_p50'] * 1e3:6.1f} ms  "
                      f"identical {r['identical']}/{r['requests']}  chose {r['chosen']}", file=sys.stderr,
                      flush=True)
        ar_texts = next((r["texts"] for r in rows if r["mode"] == "ar"), None)
        cross = {r["mode"]: sum(a == b for a, b in zip(r["texts"], ar_texts)) for r in rows
                 if ar_texts is not None and r["concurrency"] == 1}
        metrics = httpx.get(url + "/metrics", timeout=10).text
    except (asyncio.TimeoutError, TimeoutError):
        failures.append(f"time limit of {args.time_limit} s exceeded")
        cross, metrics = {}, ""
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{len(texts)} streaming greedy completions per row, max_tokens={args.max_tokens}, "
          f"prompts of {min(map(len, texts))}-{max(map(len, texts))} characters\n")
    print("| mode | concurrency | requests/s | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | per-token p50 (ms) "
          "| per-token p99 (ms) | tokens/forward | identical to alone | 5xx | chosen |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{r['ttft_p50'] * 1e3:.1f} | {r['ttft_p99'] * 1e3:.1f} | {r['tpot_p50'] * 1e3:.2f} | "
              f"{r['tpot_p99'] * 1e3:.2f} | {r['tokens_per_forward']:.2f} | {r['identical']}/{r['requests']} | "
              f"{r['n5xx']} | {', '.join(r['chosen'])} |")
    if cross:
        print(f"\nserved alone, responses identical to ar: {cross}")
    for line in metrics.splitlines():
        if line.startswith(("trimode_mode_decisions_total", "trimode_requests_total")):
            print(line)
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
    summary = {"ok": not failures, "failures": failures, "identical_to_ar_alone": cross,
               "rows": [{k: v for k, v in r.items() if k not in ("texts",)} for r in rows]}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({"ok": summary["ok"], "failures": len(failures),
                      "rows": [[r["mode"], r["concurrency"], round(r["tok_per_s"], 1)] for r in rows]}))
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
