"""Connection-level limits uvicorn does not have: a deadline for a request's headers, and idle
connections evicted (oldest first) when the connection cap is reached.

uvicorn bounds the time a keep-alive connection may sit idle *between* requests, but not a connection
that never sends a request, or sends its request line and headers a byte at a time: such connections
stay open forever, each holding a file descriptor, and at `limit_concurrency` every new request,
`/health` included, gets 503. This protocol (uvicorn's h11 protocol, subclassed) adds:

- **header timeout**: from the moment a connection opens, or a keep-alive connection finishes a
  response, the next request's line and headers must arrive within `header_timeout` seconds; then the
  connection is closed (a client that never sent a byte gets nothing; one that sent part of a request
  gets `408` with `Connection: close`).
- **JSON protocol errors**: a request h11 cannot parse gets an OpenAI-shaped 400, not plain text.
- **eviction at the cap**: when a connection arrives and `max_connections` are open, the connection
  that has been idle longest (no request in progress: never sent one, between keep-alive requests, or
  still sending headers) is closed to make room. Connections with a request in progress are never
  evicted; when all are busy, uvicorn's own limit answers the new request with 503.

The body of a request (a stalled upload) is bounded in the app (`read_json`), where the answer can be
an OpenAI-shaped 408.
"""

from __future__ import annotations

import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s")
_TIMEOUT_BODY = (b'{"error":{"message":"the request line and headers did not arrive in time",'
                 b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}')


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)` with these limits."""

    class GuardedH11Protocol(H11Protocol):
        HEADER_TIMEOUT = header_timeout
        MAX_CONNECTIONS = max_connections

        def connection_made(self, transport) -> None:
            self._header_timer = None
            self._idle_since = time.monotonic()
            self._got_bytes = False
            super().connection_made(transport)
            if len(self.connections) > self.MAX_CONNECTIONS:
                _evict_idle(self.connections, keep=self)
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._got_bytes = True
            if self._header_timer is None and not self.busy():
                self._arm_header_timer()  # bytes of a new request on a keep-alive connection
            super().data_received(data)
            if self.busy():  # the request's headers are in: the app has it now
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = time.monotonic()
            self._got_bytes = False

        def send_400_response(self, msg: str) -> None:
            """uvicorn answers a request h11 cannot parse (bad request line, oversized or malformed
            headers) with a plain-text 400; ours is OpenAI-shaped like every other error."""
            if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.close()
                return
            body = (b'{"error":{"message":"%s","type":"invalid_request_error","param":null,'
                    b'"code":"bad_http_request"}}' % msg.replace('"', "'").encode("ascii", "replace"))
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def busy(self) -> bool:
            """A request is in progress (its headers arrived; its response is not complete)."""
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            if self.HEADER_TIMEOUT and self.HEADER_TIMEOUT > 0:
                self._header_timer = self.loop.call_later(self.HEADER_TIMEOUT, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.busy() or self.transport.is_closing():
                return
            self.evict(answer=self._got_bytes)

        def evict(self, answer: bool = False) -> None:
            """Close this idle connection (with a 408 when it had sent part of a request)."""
            self._disarm_header_timer()
            if self.transport.is_closing():
                return
            if answer and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
            self.transport.close()

    return GuardedH11Protocol


def _evict_idle(connections, keep) -> None:
    """Close the longest-idle connection other than `keep` (none when every other one is busy)."""
    idle = [c for c in connections
            if c is not keep and hasattr(c, "busy") and not c.busy() and not c.transport.is_closing()]
    if idle:
        oldest = min(idle, key=lambda c: c._idle_since)
        oldest.evict()
        connections.discard(oldest)  # connection_lost comes on a later loop turn; count it gone now
