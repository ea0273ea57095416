"""Who may drive the server: a Host allow-list, an optional API key, JSON-only request bodies.

One ASGI middleware in front of every route, answering before any body is read:

- **Host** (DNS rebinding): a request whose Host header is not in `allowed_hosts` gets 400. A web page
  on another origin that resolves its own name to 127.0.0.1 then cannot reach a local server.
  `trimode serve` allows the loopback names (plus the --host it binds to) unless told otherwise.
- **API key**: with `api_key` set, every route but `/health` needs `Authorization: Bearer <key>`
  (compared in constant time); otherwise 401 with `WWW-Authenticate: Bearer`.
- **Content-Type**: a POST must say `application/json` (parameters such as charset allowed); otherwise
  415. Browsers send `text/plain` cross-origin POSTs without a CORS preflight; refusing them means a
  foreign page cannot submit work even where the Host check is off.

Errors are OpenAI-shaped, like every other error of the server.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.responses import JSONResponse

from . import schemas

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
OPEN_ROUTES = ("/health",)  # reachable without the API key (load balancers' health checks)


def host_name(header: str) -> str:
    """The host of a Host header, lower-cased, without the port (`[::1]:8000` -> `::1`)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The default allow-list of `trimode serve --host bind_host`: loopback names, the bound host
    itself (unless it is a wildcard address), and `extra`; `*` in extra turns the check off (None)."""
    extra = [e.strip().lower() for e in extra if e.strip()]
    if "*" in extra:
        return None
    names = list(LOOPBACK_HOSTS)
    if bind_host not in ("0.0.0.0", "::", ""):
        names.append(host_name(bind_host))
    return tuple(dict.fromkeys(names + extra))


class Guard:
    def __init__(self, app, *, api_key: str | None = None, allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.key = ("Bearer " + api_key).encode() if api_key else None
        self.hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        refusal = self.refuse(scope, headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code, extra = refusal
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        await JSONResponse(schemas.error_body(message, type=kind, code=code), status_code=status,
                           headers=extra)(scope, receive, send)

    def refuse(self, scope, headers: dict[str, bytes]) -> tuple[int, str, str, dict[str, str] | None] | None:
        if self.hosts is not None:
            host = host_name(headers.get("host", b"").decode("latin-1"))
            if host not in self.hosts:
                return (400, f"Host {host[:80]!r} is not allowed (allowed: {', '.join(sorted(self.hosts))}; "
                             "trimode serve --allowed-hosts)", "invalid_host", None)
        path = scope.get("path", "")
        if self.key is not None and path not in OPEN_ROUTES:
            given = headers.get("authorization", b"")
            if not hmac.compare_digest(given, self.key):
                what = "a wrong API key" if given else "no API key"
                return (401, f"this server needs an API key (Authorization: Bearer ...); the request has {what}",
                        "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if scope.get("method") == "POST":
            ctype = headers.get("content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return (415, f"request bodies must be JSON (Content-Type: application/json), got "
                             f"{ctype[:60] or 'none'!r}", "unsupported_media_type", None)
        return None
