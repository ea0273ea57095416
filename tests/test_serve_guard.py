"""Who may drive the server: the Host allow-list, the API key, JSON-only POSTs (trimode.serve.guard),
on the app and through `trimode serve`'s flags."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from test_serve import make_client  # noqa: E402

from trimode.serve.guard import allowed_hosts_for, host_name  # noqa: E402

BODY = {"prompt": "x", "max_tokens": 2}


def test_host_allow_list_blocks_rebinding():
    with make_client(allowed_hosts=("localhost", "127.0.0.1", "::1")) as c:
        for host in ("localhost:8000", "127.0.0.1", "[::1]:9", "LOCALHOST"):
            assert c.post("/v1/completions", json=BODY, headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "localhost.evil.example:8000", "127.0.0.2", ""):
            r = c.post("/v1/completions", json=BODY, headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text)
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400
    with make_client() as c:  # the app alone (tests, embedding): no Host check unless configured
        assert c.post("/v1/completions", json=BODY, headers={"Host": "anything"}).status_code == 200


def test_api_key_is_required_everywhere_but_health():
    with make_client(api_key="s3cret") as c:
        r = c.post("/v1/completions", json=BODY)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key" and "no API key" in r.json()["error"]["message"]
        for auth in ("Bearer wrong", "Bearer s3cre", "s3cret", "Bearer s3cret "):
            assert c.post("/v1/completions", json=BODY, headers={"Authorization": auth}).status_code == 401, auth
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=BODY, headers=ok).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 2}, headers=ok).status_code == 200
        assert c.get("/v1/models").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200  # load balancers' checks need no key


def test_posts_must_be_json():
    with make_client() as c:
        raw = b'{"prompt": "x", "max_tokens": 2}'
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = c.post("/v1/completions", content=raw, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (ctype, r.text)
        for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            assert c.post("/v1/completions", content=raw, headers={"Content-Type": ctype}).status_code == 200


def test_defaults_of_trimode_serve():
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:80") == "example.com"
    assert allowed_hosts_for("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts_for("0.0.0.0", ["my.host"]) == ("localhost", "127.0.0.1", "::1", "my.host")
    assert allowed_hosts_for("10.0.0.5") == ("localhost", "127.0.0.1", "::1", "10.0.0.5")
    assert allowed_hosts_for("0.0.0.0", ["*"]) is None


def test_cli_flags_reach_the_app(monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    from trimode.serve.cli import build, build_parser

    monkeypatch.setenv("TRIMODE_API_KEY", "from-env")
    args = build_parser().parse_args(["--model", "bundled", "--fake-decoder", "--allowed-hosts", "box.lan"])
    app, engine, settings, _ = build(args)
    assert settings.api_key == "from-env"
    assert settings.allowed_hosts == ("localhost", "127.0.0.1", "::1", "box.lan")
    with TestClient(app, base_url="http://box.lan") as c:
        assert c.post("/v1/completions", json=BODY).status_code == 401
        assert c.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer from-env"}).status_code == 200
    args = build_parser().parse_args(["--model", "bundled", "--fake-decoder", "--api-key", ""])
    _, _, settings, _ = build(args)
    assert settings.api_key is None and settings.allowed_hosts == ("localhost", "127.0.0.1", "::1")
