"""The checks every request passes before any endpoint runs (one ASGI middleware, in order):

1. Host header: a server bound to loopback answers only to loopback names, so a web page
   elsewhere cannot reach it through DNS rebinding (400).
2. Origin: a state-changing request sent by a browser from another origin is refused (403);
   with no CORS headers the page could not read the answer anyway, but it would still
   spend the server's time.
3. API key on /v1/* and /metrics when one is set: `Authorization: Bearer KEY`, compared in
   constant time (401).
4. Body size: a declared Content-Length over the limit is refused before reading (413); a
   body that turns out longer while streaming in is cut off and answered 413 as well.
5. Concurrency: POSTs to /v1/* beyond `max_concurrent` in progress get 429 with
   Retry-After; a slot is held until the response (a whole stream) is sent.
Every response gets the security headers below.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from .errors import error_body
from .settings import Settings

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
     b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class _BodyTooLarge(Exception):
    pass


async def _send_error(send, status: int, message: str, *, code: str, param: str | None = None,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    import json

    body = json.dumps(error_body(status, message, param=param, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app, settings: Settings, state):
        self.app = app
        self.settings = settings
        self.state = state  # .active: requests holding a concurrency slot
        self.api_key = settings.resolved_api_key()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope["method"], scope["path"]
        host = headers.get("host", "")
        if not self.settings.host_allowed(host):
            return await _send_error(send, 400, f"this server does not answer to the host name {host!r}; call it by "
                                                f"127.0.0.1 or localhost (or start it with --allowed-host)",
                                     code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS and urlsplit(origin).netloc.lower() != host.lower():
            return await _send_error(send, 403, f"cross-origin requests are not allowed (origin {origin!r})",
                                     code="cross_origin")
        if self.api_key and (path.startswith("/v1/") or path == "/metrics"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                why = "no API key given" if not given else "incorrect API key"
                return await _send_error(send, 401, f"{why}: send 'Authorization: Bearer KEY' with this server's key",
                                         code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await _send_error(send, 400, "invalid Content-Length header", code="invalid_request")
            if int(declared) > limit:
                return await _send_error(send, 413, f"the request body is {int(declared):,} bytes; this server accepts "
                                                    f"at most {limit:,}", code="request_too_large")
        limited = method == "POST" and path.startswith("/v1/")
        if limited and self.state.active >= self.settings.max_concurrent:
            return await _send_error(send, 429, f"the server is busy ({self.state.active} requests in progress, the "
                                                f"limit is {self.settings.max_concurrent}); retry in a moment",
                                     code="server_busy", headers=[(b"retry-after", b"1")])
        received = 0
        too_large = False
        started = False

        async def counted_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large and not started:  # whatever the app made of the cut-off body, the answer is 413
                started = True
                await _send_error(send, 413, f"the request body is larger than {limit:,} bytes",
                                  code="request_too_large")
                return
            if too_large:
                return
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if limited:
            self.state.active += 1
        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, f"the request body is larger than {limit:,} bytes",
                                  code="request_too_large")
        finally:
            if limited:
                self.state.active -= 1
