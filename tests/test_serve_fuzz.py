"""Fuzzing the HTTP layer with hypothesis: malformed JSON, wrong types, huge numbers, negative max_tokens,
empty messages, unknown roles, invalid UTF-8, oversized bodies. Every malformed request is a 4xx in the
OpenAI error shape, nothing is ever a 5xx, and the server stays healthy.

Examples per test: TRIMODE_FUZZ_EXAMPLES (default 25 in CI). docs/serving.md records a run with
TRIMODE_FUZZ_EXAMPLES=1000 (thousands of requests).
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve import make_client  # noqa: E402

EXAMPLES = int(os.environ.get("TRIMODE_FUZZ_EXAMPLES", "25"))
settings.register_profile("serve-fuzz", max_examples=EXAMPLES, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings.get_profile("serve-fuzz")
BODY_LIMIT = 4096
ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]
COUNT = {"requests": 0, "ok": 0}


@pytest.fixture(scope="module")
def client():
    with make_client(max_body_bytes=BODY_LIMIT, max_tokens_limit=64, default_max_tokens=8, context=256) as c:
        yield c
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["running"] == 0
        print(f"\nfuzz: {COUNT['requests']} requests, {COUNT['ok']} answered 200, the rest 4xx; server healthy")


def post(client, url: str, content: bytes):
    COUNT["requests"] += 1
    return client.post(url, content=content, headers={"content-type": "application/json"})


def check(r, *, may_succeed: bool) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200 and may_succeed:
        COUNT["ok"] += 1
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n")
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=12)


@FUZZ
@given(url=st.sampled_from(ENDPOINTS), body=st.binary(max_size=300))
def test_random_bytes(client, url, body):
    check(post(client, url, body), may_succeed=False)


@FUZZ
@given(url=st.sampled_from(ENDPOINTS), value=json_values)
def test_random_json(client, url, value):
    check(post(client, url, json.dumps(value).encode()), may_succeed=False)


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "decoding", "n", "logprobs", "stream_options", "echo"]
nasty = (json_values | st.integers(min_value=-10**6, max_value=0) | st.just(10**400) | st.just(-(10**30))
         | st.just([]) | st.just({}) | st.just("\ud800") | st.text(min_size=1, max_size=5))


@FUZZ
@given(url=st.sampled_from(ENDPOINTS), field=st.sampled_from(FIELDS), value=nasty,
       role=st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard", "", "USER"]),
       mode=st.sampled_from(["auto", "ar", "linear", "quadratic", "diffusion", "AR", "x"]))
def test_mutated_requests(client, url, field, value, role, mode):
    """A valid request with one field replaced by an arbitrary value: 200 when still valid, else 4xx."""
    body = {"model": "fake", "max_tokens": 4, "decoding": {"mode": mode, "block_len": 4}}
    body["prompt" if url == "/v1/completions" else "messages"] = (
        "def f():" if url == "/v1/completions" else [{"role": role, "content": "hi"}])
    body[field] = value
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    check(post(client, url, raw), may_succeed=True)


@FUZZ
@given(url=st.sampled_from(ENDPOINTS), mutation=st.sampled_from(
    ["truncate", "invalid_utf8", "huge_number", "nan", "deep", "oversize", "empty_messages", "negative"]),
    cut=st.integers(min_value=0, max_value=60))
def test_corrupted_bodies(client, url, mutation, cut):
    key = "prompt" if url == "/v1/completions" else "messages"
    good = {"max_tokens": 4, key: "x" if key == "prompt" else [{"role": "user", "content": "hi"}]}
    raw = json.dumps(good).encode()
    if mutation == "truncate":
        raw = raw[: cut % len(raw)]
    elif mutation == "invalid_utf8":
        raw = raw[:-2] + b"\xc3\x28\xff" + raw[-2:]
    elif mutation == "huge_number":
        raw = raw.replace(b'"max_tokens": 4', b'"max_tokens": 9' + b"9" * (cut * 100 + 30))
    elif mutation == "nan":
        raw = raw.replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": NaN')
    elif mutation == "deep":
        raw = b'{"decoding": ' + b"[" * (cut * 1000 + 1000) + b"]" * (cut * 1000 + 1000) + b"}"
    elif mutation == "oversize":
        raw = json.dumps({**good, "stop": "y" * (BODY_LIMIT + cut)}).encode()
    elif mutation == "empty_messages":
        raw = json.dumps({**good, key: [] if key == "messages" else ""}).encode()
    elif mutation == "negative":
        raw = json.dumps({**good, "max_tokens": -cut - 1}).encode()
    r = post(client, url, raw)
    check(r, may_succeed=False)
    if mutation == "oversize":
        assert r.status_code == 413


@FUZZ
@given(chunks=st.lists(st.binary(min_size=1, max_size=2048), min_size=1, max_size=6))
def test_streamed_bodies_without_length(client, chunks):
    """Chunked uploads (no Content-Length) are counted too: over the limit is 413, never 5xx."""
    COUNT["requests"] += 1
    r = client.post("/v1/completions", content=iter(chunks), headers={"content-type": "application/json"})
    check(r, may_succeed=False)
    if sum(map(len, chunks)) > BODY_LIMIT:
        assert r.status_code == 413
