"""Operations: a request id on every request, Prometheus metrics, and log lines that carry the id.

`RequestTracking` is the outermost middleware. For every HTTP request it

- takes the client's `X-Request-ID` when it is sane (1-128 characters of letters, digits and
  `-_.:`), else makes one (32 hex digits); sends it back in the `X-Request-ID` response header,
  makes it the current id (`request_id()`: the chat completion's `id` is `chatcmpl-<id>`) and
  puts it in every log line written while the request runs (`RequestIdFilter`);
- counts it in the metrics by route, method and status code, times it, counts error responses
  by their OpenAI error code, and writes one access-log line (method, path, status, time);
- turns an unexpected exception into OpenAI's 500 error JSON (the traceback goes to the log,
  with the id; the response says only that the log has the details).

`Metrics` holds the Prometheus metrics of one app in its own registry (`GET /metrics`):

    multimodal_http_requests_total{route, method, status}
    multimodal_http_request_duration_seconds{route, method}     histogram
    multimodal_errors_total{status, code}                        error responses (and stream errors)
    multimodal_prompt_tokens_total{model}, multimodal_generated_tokens_total{model}
    multimodal_transcriptions_total{model, source}               audio transcribed: source "upload"
                                                                 (/v1/audio/transcriptions) or "chat" (input_audio)
    multimodal_transcribed_audio_seconds_total{model}            seconds of audio transcribed
    multimodal_requests_in_progress                              requests holding a concurrency slot
    multimodal_generations_in_flight                             generations started and not ended
    multimodal_queue_depth                                       model calls waiting for a worker thread
    multimodal_generation_queue_depth                            generations waiting for a place in the batch
    multimodal_batch_size                                        sequences being decoded now
    multimodal_decode_batch_size                                 histogram: sequences per decoding step
    multimodal_server_info{version, vlm, embedder, device}
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from .errors import error_body
from .guards import SECURITY_HEADERS

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MAX_ERROR_BODY = 64 * 1024

log = logging.getLogger("multimodal_models.serve")


def request_id() -> str | None:
    """The id of the request being served (None outside a request)."""
    return _REQUEST_ID.get()


def new_request_id(given: str | None) -> str:
    """The client's id if it is sane, else a fresh one."""
    if given is not None and _SANE_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (the current request's, or "-") to every log record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = _REQUEST_ID.get() or "-"
        return True


log.addFilter(RequestIdFilter())  # records logged here carry the id whatever handler prints them


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process do not mix)."""

    def __init__(self, *, in_progress: Callable[[], float], info: dict[str, str],
                 batch_size: Callable[[], float] = lambda: 0, generations_waiting: Callable[[], float] = lambda: 0):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("multimodal_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("multimodal_http_request_duration_seconds",
                                 "time from a request's arrival to the end of its response (a whole stream)",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = Counter("multimodal_errors", "error responses by HTTP status and OpenAI error code (a stream "
                                                   "cut off by the time limit counts with status 200)",
                              ["status", "code"], registry=registry)
        self.prompt_tokens = Counter("multimodal_prompt_tokens", "prompt tokens read by generations (images "
                                                                 "included)", ["model"], registry=registry)
        self.generated_tokens = Counter("multimodal_generated_tokens", "tokens generated", ["model"],
                                        registry=registry)
        self.transcriptions = Counter("multimodal_transcriptions", "audio transcribed by the speech model, by source: "
                                      "'upload' (/v1/audio/transcriptions) or 'chat' (input_audio parts)",
                                      ["model", "source"], registry=registry)
        self.audio_seconds = Counter("multimodal_transcribed_audio_seconds", "seconds of audio transcribed",
                                     ["model"], registry=registry)
        self.in_progress = Gauge("multimodal_requests_in_progress", "API requests holding a concurrency slot "
                                                                    "(--max-concurrent)", registry=registry)
        self.in_progress.set_function(in_progress)
        self.generations = Gauge("multimodal_generations_in_flight", "text generations started and not yet ended",
                                 registry=registry)
        self.queued = Gauge("multimodal_queue_depth", "model calls waiting for a free worker thread (--workers)",
                            registry=registry)
        self.batch_size = Gauge("multimodal_batch_size", "sequences being decoded now (continuous batching; at most "
                                                         "--max-batch-size)", registry=registry)
        self.batch_size.set_function(batch_size)
        self.generation_queue = Gauge("multimodal_generation_queue_depth", "generations waiting for a place in the "
                                                                          "decode batch (at most --max-queue)",
                                      registry=registry)
        self.generation_queue.set_function(generations_waiting)
        self.decode_batch = Histogram("multimodal_decode_batch_size", "sequences decoded together, per decoding step",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        Info("multimodal_server", "what this server runs", registry=registry).info(info)

    def generation_started(self, model: str, prompt_tokens: int) -> None:
        self.generations.inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)

    def generation_ended(self, model: str, completion_tokens: int) -> None:
        self.generations.dec()
        self.generated_tokens.labels(model).inc(completion_tokens)

    def transcribed(self, model: str, source: str, seconds: float) -> None:
        self.transcriptions.labels(model, source).inc()
        self.audio_seconds.labels(model).inc(seconds)

    def error(self, status: int, code: str | None) -> None:
        self.errors.labels(str(status), code or "none").inc()

    def exposition(self) -> tuple[bytes, str]:
        """(the text format, its content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
        return error.get("code") or error.get("type")
    except (ValueError, AttributeError):
        return None


class RequestTracking:
    """ASGI middleware: request id, metrics and the access log (see the module's docstring)."""

    def __init__(self, app, metrics: Metrics, route_of: Callable[[dict], str]):
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), None)
        rid = new_request_id(given)
        _REQUEST_ID.set(rid)  # each request runs in its own task, with its own copy of the context
        started = time.perf_counter()
        status: int | None = None
        body: list[bytes] = []  # of an error response, for its code

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), rid.encode())]}
            elif message["type"] == "http.response.body" and status >= 400 and sum(map(len, body)) < MAX_ERROR_BODY:
                body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("unexpected error")
            if status is not None:  # a stream broke off after it started: counted here, as its status is 200
                self.metrics.error(status, "internal_error")
            else:
                content = json.dumps(error_body(500, "internal server error (the server's log has the details)",
                                                code="internal_error")).encode()
                await tracked_send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                    *SECURITY_HEADERS]})
                await tracked_send({"type": "http.response.body", "body": content})
        finally:
            if status is None:  # cancelled before answering: the client went away (nginx's 499)
                status = 499
            seconds = time.perf_counter() - started
            route, method = self.route_of(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(seconds)
            if status >= 400 and status != 499:
                self.metrics.error(status, _error_code(b"".join(body)))
            log.info("%s %s %d %.0f ms", method, scope["path"], status, seconds * 1000)
