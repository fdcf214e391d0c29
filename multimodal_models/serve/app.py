"""The FastAPI app: `create_app(settings)`.

Endpoints (OpenAPI schema at /openapi.json, rendered at /docs; the web page at /):

    POST /v1/chat/completions   OpenAI chat: text + image_url parts, streamed (SSE) or not
    POST /v1/embeddings         OpenAI embeddings of texts and (extension) images
    POST /v1/audio/transcriptions  OpenAI speech to text (multipart upload; with --speech-model); chat
                                messages' input_audio parts are transcribed by the same model
    POST /v1/search             the image index by text and/or image: paths, scores, thumbnails
    POST /v1/caption            caption an image     (JSON with a data: URI, or a multipart upload)
    POST /v1/answer             answer a question about an image                  (same)
    POST /v1/classify           zero-shot classification over given labels       (same)
    GET  /v1/models             the served models (by --served-model-name when given)
    GET  /health                liveness and load
    GET  /metrics               Prometheus metrics (observe.py)

Models run in a thread pool (`Settings.workers`) on `Settings.device`; the event loop only
parses, checks and streams. Text generation is continuously batched (`batching.py`): each
request's prompt runs in a worker thread, then its tokens are decoded side by side with the other
requests' in one engine thread (`--max-batch-size` at once, `--max-queue` more waiting). Errors are OpenAI's error JSON (`errors.py`); the request checks
that come before any endpoint are in `guards.py`; image references are resolved in
`images.py`; request ids, metrics and the access log are in `observe.py`.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..data.audio import AudioLoadError, load_audio
from ..data.images import encode_png, load_image
from ..data.tokenizer import IMAGE
from ..errors import ImageLoadError, MultimodalError
from ..index import ImageIndex
from ..index.rerank import Reranker
from ..loading import DEFAULT_DUAL_ENCODER, SHIPPED, load
from ..models.vlm import CAPTION_PROMPT
from ..version import __version__
from . import images as image_refs
from . import schemas as S
from .batching import BatchEngine, TokenFeed
from .errors import APIError, bad_request, error_response
from .generation import REFUSAL, GenerationJob, GenerationOptions, OutputFilter
from .guards import RequestGuard
from .observe import Metrics, RequestTracking, request_id
from .settings import Settings

log = logging.getLogger("multimodal_models.serve")
STATIC = Path(__file__).parent / "static"
MAX_STOP_STRINGS = 4

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": S.ErrorResponse, "description": why}
    for status, why in ((400, "invalid request: the message says which field and why"),
                        (401, "missing or wrong API key"),
                        (403, "not allowed: a file outside --image-root, a cross-origin request"),
                        (404, "unknown model, or no index configured"),
                        (413, "request body or image too large"),
                        (415, "unsupported content type"),
                        (429, "too many requests in progress; see Retry-After"),
                        (504, "the request ran past the server's time limit"))
}


def model_id(name: str) -> str:
    """How /v1/models names a model: a shipped name as is, a folder by its last part (the
    server's file layout stays private)."""
    return name if name in SHIPPED else Path(name).expanduser().resolve().name or name


@dataclass
class ServedModel:
    model: Any
    id: str  # the name the API reports (the first of --served-model-name when given)
    name: str  # as given (name or folder)
    kind: str  # "vlm" | "dual_encoder" | "speech_to_text"
    created: int
    aliases: tuple[str, ...] = ()  # --served-model-name: the only names requests may use (else id and name)

    @property
    def names(self) -> tuple[str, ...]:
        """The names a request's `model` may give."""
        return self.aliases or (self.id, self.name)

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)


class Engine:
    """The models, the index and the worker threads behind the endpoints."""

    def __init__(self, settings: Settings, vlm: ServedModel | None, embedder: ServedModel | None, index,
                 speech: ServedModel | None = None):
        self.settings = settings
        self.vlm = vlm
        self.embedder = embedder
        self.speech = speech
        self.index = index
        self._executor: ThreadPoolExecutor | None = None
        self.filter = OutputFilter.from_settings(settings)
        self.active = 0  # requests holding a concurrency slot (RequestGuard)
        served = [m for m in (vlm, embedder, speech) if m is not None]
        self.metrics = Metrics(in_progress=lambda: self.active, info={
            "version": __version__, "vlm": vlm.id if vlm else "", "embedder": embedder.id if embedder else "",
            "speech": speech.id if speech else "",
            "device": ",".join(sorted({m.device for m in served}))},
            batch_size=lambda: self.batcher.size if self.batcher else 0,
            generations_waiting=lambda: self.batcher.admission.waiting if self.batcher else 0)
        self.batcher = None  # the generation engine (continuous batching) of the VLM
        if vlm is not None:
            self.batcher = BatchEngine(vlm.model, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                       observe_step=self.metrics.decode_batch.observe)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The worker threads (made on first use, so an app can be started again after a shutdown)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="multimodal-model")
        return self._executor

    async def run(self, fn, *args, abandoned=None, **kwargs):
        """fn(*args) in a worker thread (in this request's context: its log lines carry its id);
        errors in the user's input become 400s. abandoned(result): called with what fn returns
        when the request has gone away meanwhile."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        queued = self.metrics.queued
        queued.inc()

        def call():
            queued.dec()
            return context.run(fn, *args, **kwargs)

        future = loop.run_in_executor(self.executor, call)
        try:
            return await future
        except asyncio.CancelledError:
            if abandoned is not None:
                future.add_done_callback(lambda f: abandoned(f.result()) if not f.cancelled() and
                                         f.exception() is None else None)
            raise
        except APIError:
            raise
        except ImageLoadError as exc:
            raise bad_request(str(exc), code="invalid_image") from None
        except (MultimodalError, ValueError) as exc:
            raise bad_request(str(exc)) from None

    def require(self, kind: str, requested: str | None, *, what: str) -> ServedModel:
        served = {"vlm": self.vlm, "dual_encoder": self.embedder, "speech_to_text": self.speech}[kind]
        others = [m for m in (self.vlm, self.embedder, self.speech) if m is not None and m is not served]
        if requested is not None and served is not None and requested in served.names:
            return served
        if requested is not None and any(requested in m.names for m in others):
            need = {"vlm": "a vision-language model (VLM)", "dual_encoder": "a dual encoder",
                    "speech_to_text": "a speech-to-text model"}[kind]
            have = f"; this server's is '{served.id}'" if served else ""
            raise APIError(400, f"model '{requested}' cannot do {what}: that needs {need}{have}", param="model",
                           code="model_not_supported")
        if served is None:
            flag = {"vlm": "--model", "dual_encoder": "--embedder", "speech_to_text": "--speech-model"}[kind]
            raise APIError(404, f"this server runs no model for {what} (start it with {flag} NAME)", param="model",
                           code="model_not_found")
        if requested is not None:
            raise APIError(404, f"the model '{requested}' is not served here; for {what} use '{served.id}' "
                                "(GET /v1/models lists them)", param="model", code="model_not_found")
        return served

    def transcribe(self, data: bytes, *, param: str, language: str | None = None,
                   source: str) -> tuple[str, str | None, float]:
        """(text, language, seconds) of an encoded audio file, in the calling (worker) thread. The audio is
        refused (400 naming `param`) when it is not audio or longer than --max-audio-seconds or the speech
        model's window."""
        served = self.speech
        config = served.model.config
        limit = self.max_audio_seconds()
        which = "--max-audio-seconds" if limit == self.settings.max_audio_seconds else "the speech model's window"
        try:
            samples = load_audio(data, rate=config.sampling_rate, max_seconds=limit,
                                 max_bytes=self.settings.max_body_bytes, name=param)
        except AudioLoadError as exc:
            raise bad_request(str(exc).replace("(max_seconds)", f"({which})"), param=param,
                              code="invalid_audio") from None
        seconds = len(samples) / config.sampling_rate
        language = self.speech_language(language)
        [(text, detected)] = served.model.transcribe_with_language([samples], source_rate=config.sampling_rate,
                                                                   language=language)
        self.metrics.transcribed(served.id, source, seconds)
        return text.strip(), detected or language, seconds

    def max_audio_seconds(self) -> float:
        """The longest audio transcribed: --max-audio-seconds, or the speech model's window if shorter."""
        return min(self.settings.max_audio_seconds, float(self.speech.model.config.chunk_length))

    def speech_language(self, language: str | None) -> str | None:
        """The language to pass the speech model (None: its own or detected); 400 naming `language` when it
        does not know it. An English-only model takes 'en' as given."""
        if language is None or not language.strip():
            return None
        config = self.speech.model.config
        if not config.language_tokens:
            if language.strip().lower() in ("en", "english", "<|en|>"):
                return None
            raise bad_request(f"language {language!r}: this speech model is English-only (en)", param="language",
                              code="unsupported_language")
        try:
            self.speech.model.language_token(language)
        except ValueError as exc:
            raise bad_request(f"language: {exc}", param="language", code="unsupported_language") from None
        return language.strip().lower().strip("<|>")

    async def generate(self, served: ServedModel, messages: Callable[[], list[dict]], options: GenerationOptions,
                       deadline: float) -> GenerationJob:
        """Start a generation, counted in the metrics until it ends: wait for a place in the decode batch
        (429 when the queue is full), then in a worker thread make the messages (`messages()`: images
        decoded there) and hand the sequence to the engine."""
        slot = await self.batcher.admission.acquire(deadline - time.monotonic())
        feed = TokenFeed(asyncio.get_running_loop())

        def start() -> GenerationJob:
            job = GenerationJob.start(served.model, messages(), options, self.settings, deadline, feed=feed, slot=slot,
                                      batched=self.batcher.batched,
                                      on_end=lambda job: self.metrics.generation_ended(served.id, job.completion_tokens))
            self.metrics.generation_started(served.id, job.prompt_tokens)
            if job.sequence is not None:
                self.batcher.submit(job.sequence)
            return job

        try:
            return await self.run(start, abandoned=lambda job: job.close())
        except BaseException:
            slot.release()  # (a slot already given back is not given twice)
            raise

    async def pieces(self, job: GenerationJob) -> AsyncIterator[str]:
        """The job's text, piece by piece, as the engine makes its tokens (a custom output filter, which may
        be slow, runs in a worker thread; the rest here)."""
        inline = self.settings.output_filter is None
        while not job.done:
            piece = job.next_piece() if inline else await self.run(job.next_piece)
            if piece:
                yield piece
            elif not job.done:
                await job.wait()

    def close(self) -> None:
        """Stop the worker threads (at the server's shutdown); the index stays open for a restart."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.close()


# --- loading ------------------------------------------------------------------------------------


def load_served(name: str, kind: str, dtype: str | None = None, device: str = "auto",
                aliases: tuple[str, ...] = (), *, quantize: str | None = None, runtime: str = "torch",
                adapter: str | None = None) -> ServedModel:
    needed_by = {"vlm": "--model", "dual_encoder": "--embedder", "speech_to_text": "--speech-model"}[kind]
    model = load(name, device=device, dtype=dtype, quantize=quantize, runtime=runtime, adapter=adapter, expect=kind,
                 needed_by=needed_by)
    return ServedModel(model, aliases[0] if aliases else model_id(name), name, kind, int(time.time()), aliases)


def _served(given, name: str | None, kind: str, settings: Settings, index_info: dict | None = None
            ) -> ServedModel | None:
    aliases = {"vlm": settings.served_model_name, "dual_encoder": settings.served_embedder_name,
               "speech_to_text": settings.served_speech_name}[kind]
    if given is not None:  # a model object passed in (tests, benchmarks): named after `name` if any, on its device
        return ServedModel(given, aliases[0] if aliases else model_id(name or kind), name or kind, kind,
                           int(time.time()), aliases)
    if not name:
        return None
    vlm = kind == "vlm"  # --runtime is the embedder's, --adapter the VLM's, --quantize not the speech model's
    runtime = settings.runtime if kind == "dual_encoder" else "torch"
    dtype, quantize = settings.dtype, settings.quantize if kind != "speech_to_text" else None
    if index_info:  # the embedder of an index embeds as the index's vectors were, unless told otherwise
        dtype = dtype or index_info.get("model_dtype")
        quantize = quantize or (index_info.get("model_quantize") if runtime == "torch" else None)
    return load_served(name, kind, dtype, settings.device, aliases, quantize=quantize, runtime=runtime,
                       adapter=settings.adapter if vlm else None)


def build_engine(settings: Settings, *, vlm=None, embedder=None, speech=None) -> Engine:
    """Load what the settings name, on settings.device in settings.dtype (a model object passed in
    is used as is, for tests and benchmarks). The index's queries are embedded by the embedder,
    so on its device."""
    index = None
    embedder_name = settings.embedder
    if settings.index is not None:
        index = ImageIndex.open(settings.index)
    if embedder_name == "auto":  # the model that built the index, else the shipped one
        embedder_name = (index.info.get("model_name") if index is not None else None) or DEFAULT_DUAL_ENCODER
    served_vlm = _served(vlm, settings.model, "vlm", settings)
    served_embedder = _served(embedder, embedder_name, "dual_encoder", settings,
                              index.info if index is not None else None)
    if index is not None:
        if served_embedder is None:
            raise MultimodalError(f"--index {settings.index} needs the dual encoder that built it (--embedder)")
        index.check_model(served_embedder.model)
    served_speech = _served(speech, settings.speech_model, "speech_to_text", settings)
    return Engine(settings, served_vlm, served_embedder, index, served_speech)


# --- request helpers ----------------------------------------------------------------------------


_TYPE_NAMES = ("str", "int", "float", "bool", "list", "dict", "none", "null")


def _field_path(loc) -> list[str]:
    """pydantic's error location as the request's field path: without the union branches it tried
    ("str", "list[...]", "ImageURL", "function-after[...]") and without repeated discriminator tags."""
    path: list[str] = []
    for part in (str(p) for p in loc if p != "body"):
        if part.lower() in _TYPE_NAMES or "[" in part or "-" in part or part[:1].isupper():
            continue
        if path and path[-1] == part and not part.isdigit():  # the tag of a tagged union, then its field
            continue
        path.append(part)
    return path


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The most specific of pydantic's errors, as an OpenAI error naming the field."""
    errors = exc.errors()
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # the deepest is the most specific (unions)
    path = _field_path(first.get("loc", ()))
    param = ".".join(path)
    kind = first.get("type")
    if kind == "json_invalid":
        message, code, param = "the request body is not valid JSON", "invalid_json", ""
    elif kind == "missing" and not param:
        message, code = "the request body is empty; send a JSON object", "invalid_json"
    elif kind == "missing":
        message, code = f"missing required field '{param}'", "missing_required_parameter"
    elif kind == "extra_forbidden":
        message, code = f"unrecognized request argument supplied: {param}", "unknown_parameter"
    elif kind in ("model_attributes_type", "dict_type", "model_type") and not param:
        message, code = "the request body must be a JSON object (Content-Type: application/json)", "invalid_json"
    else:
        message, code = f"{param or 'body'}: {first.get('msg', 'invalid value')}", "invalid_value"
        given = first.get("input")
        if given is None or (isinstance(given, (str, int, float)) and not isinstance(given, bool)):
            message += f" (got {json.dumps(given)[:80]})"
    others = {tuple(_field_path(e.get("loc", ()))[:1]) for e in errors} - {tuple(path[:1])}
    if others:  # other fields are wrong too (alternatives of one union field are not counted)
        message += f" (also wrong: {', '.join(sorted('.'.join(o) or 'body' for o in others))})"
    return APIError(400, message, param=param or None, code=code)


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def check_chat_options(body: S.ChatCompletionRequest) -> None:
    """Refuse (400, naming the field) every option of OpenAI's request this server cannot honour.
    The fields honoured are read by the endpoint; those that change nothing about the answer
    (user, metadata, prompt_cache_key, ...) pass; a field OpenAI does not have is unrecognized."""
    for name in (body.model_extra or {}):
        raise APIError(400, f"unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    if body.n is not None and body.n != 1:
        raise _refuse("n", f"n={body.n}: this server returns one choice per request (n=1)")
    if body.response_format is not None and body.response_format.type != "text":
        raise _refuse("response_format", f"response_format {{'type': '{body.response_format.type}'}} is not "
                                         "supported: this server does not constrain the output to JSON. Omit it (or "
                                         "use {'type': 'text'}) and ask for JSON in the prompt")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise _refuse(name, f"{name} is not supported by this server (only 0)")
    if body.logprobs or body.top_logprobs:
        name = "logprobs" if body.logprobs else "top_logprobs"
        raise _refuse(name, f"{name}: logprobs are not supported by this server")
    if body.logit_bias:
        raise _refuse("logit_bias", "logit_bias is not supported by this server")
    if body.modalities is not None and body.modalities != ["text"]:
        raise _refuse("modalities", f"modalities {body.modalities}: this server's output is text only (['text'])")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise _refuse(name, f"{name} are not supported by this server (no tool or function calling)")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise _refuse(name, f"{name} is not supported by this server (no tool or function calling; only 'none')")
    for name, what in (("audio", "audio output"), ("prediction", "predicted outputs"),
                       ("reasoning_effort", "reasoning effort (the model does not reason first)"),
                       ("verbosity", "verbosity"), ("web_search_options", "web search"),
                       ("moderation", "moderation options (the server has its own output filter)")):
        if getattr(body, name) is not None:
            raise _refuse(name, f"{name}: {what} is not supported by this server")
    if body.store:
        raise _refuse("store", "store=true: this server stores no completions")
    if body.service_tier not in (None, "auto", "default"):
        raise _refuse("service_tier", f"service_tier {body.service_tier!r}: this server has one tier ('auto' or "
                                      "'default')")


def check_text(text: str, settings: Settings, *, param: str) -> str:
    if len(text) > settings.max_prompt_chars:
        raise APIError(400, f"{param} is {len(text):,} characters; this server accepts at most "
                            f"{settings.max_prompt_chars:,}", param=param, code="prompt_too_long")
    if IMAGE in text:
        raise bad_request(f"{param} contains the reserved marker '{IMAGE}'; send images as image parts",
                          param=param)
    return text


def check_images(count: int, settings: Settings) -> None:
    if count > settings.max_images:
        raise APIError(400, f"the request has {count} images; this server accepts at most {settings.max_images}",
                       code="too_many_images")


def decode_all(sources: list[tuple[Any, str]], settings: Settings) -> list:
    return [image_refs.decode(source, settings, param=param) for source, param in sources]


def image_url_of(part) -> str:
    return part.image_url if isinstance(part.image_url, str) else part.image_url.url


async def image_part_source(part: S.ImagePart | S.ImageRefPart, settings: Settings, *,
                            param: str) -> tuple[bytes | Path, str]:
    """(the image's bytes or allowed path, the field that named it) of an image part in any form:
    OpenAI's image_url, or transformers' url / path / base64 / image (by the server's rules for
    each: paths inside --image-root, http(s) only with --allow-remote-images)."""
    if isinstance(part, S.ImagePart):
        return await image_refs.image_source(image_url_of(part), settings, param=param + ".image_url"), \
            param + ".image_url"
    given = [key for key in ("url", "path", "base64", "image") if getattr(part, key) is not None]
    if len(given) != 1:
        raise bad_request(f"{param}: an image part names its image by one of url, path, base64 or image"
                          + (f"; this one has {' and '.join(given)}" if given else ""),
                          param=param, code="invalid_image_url")
    key = given[0]
    value, field = getattr(part, key), f"{param}.{key}"
    if key == "path":
        return image_refs.local_path(value, settings, param=field), field
    if key == "base64":
        return image_refs.parse_base64(value, param=field), field
    return await image_refs.image_source(value, settings, param=field), field


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(root: Path | None, relative: str, size: int, settings: Settings) -> str | None:
    """A PNG data: URI of an indexed image (metadata stripped), if it lies inside the index's folder."""
    if root is None:
        return None
    real_root = Path(os.path.realpath(root))
    path = Path(os.path.realpath(real_root / relative))
    if real_root not in path.parents:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return _thumbnail(str(path), stat.st_mtime_ns, stat.st_size, size, settings.max_image_pixels)


@functools.lru_cache(maxsize=2048)
def _thumbnail(path: str, _mtime_ns: int, _size: int, side: int, max_pixels: int) -> str | None:
    """Cached by file, modification time and size: a changed file gets a new thumbnail."""
    try:
        image = load_image(path, max_pixels=max_pixels)
    except ImageLoadError:
        return None
    image.thumbnail((side, side))
    return data_uri(encode_png(image))


async def read_upload_body(request: Request, model: type[BaseModel], engine: Engine, *,
                           list_fields: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """JSON (image as a data: URI, path or URL) or multipart (image as an uploaded file) ->
    (validated body, image source)."""
    settings = engine.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON", code="invalid_json") from None
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        return body, await image_refs.image_source(body.image, settings, param="image")
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException

        try:  # two files: the image, and one misplaced file that gets a precise error below
            form = await request.form(max_files=2, max_fields=settings.max_labels + 16,
                                      max_part_size=settings.max_body_bytes)
        except MultiPartException as exc:
            raise bad_request(f"invalid multipart body: {exc.message}", code="invalid_multipart") from None
        except StarletteHTTPException as exc:  # Starlette's own wrapping of the parser's errors
            raise bad_request(f"invalid form body: {exc.detail}", code="invalid_multipart") from None
        except (ValueError, KeyError, AssertionError) as exc:
            raise bad_request(f"invalid multipart body: {exc}", code="invalid_multipart") from None
        fields: dict[str, Any] = {}
        for key in form.keys():
            values = form.getlist(key)
            if key == "image":
                continue
            if any(not isinstance(v, str) for v in values):
                raise bad_request(f"field '{key}' must be text, not a file", param=key)
            if key in list_fields:
                fields[key] = [s.strip() for v in values for s in (v.split(",") if len(values) == 1 else [v])
                               if s.strip()]
            else:
                fields[key] = values[-1]
        upload = form.get("image")
        if upload is None:
            raise APIError(400, "missing required field 'image' (the image file)", param="image",
                           code="missing_required_parameter")
        try:
            body = model.model_validate({**fields, "image": "upload"})
        except ValidationError as exc:
            raise validation_error(exc) from None
        if isinstance(upload, UploadFile):
            source = await upload.read()
            if not source:
                raise bad_request("image: the uploaded file is empty", param="image", code="invalid_image")
            return body, source
        return body, await image_refs.image_source(upload, settings, param="image")
    raise APIError(415, f"unsupported content type {content_type or '(none)'!r}: send application/json (image as a "
                        "data: URI) or multipart/form-data (image as a file in the field 'image')",
                   code="unsupported_media_type")


TRANSCRIPTION_FIELDS = ("model", "language", "response_format", "prompt", "temperature", "stream",
                        "timestamp_granularities[]", "timestamp_granularities", "include[]", "include",
                        "chunking_strategy", "known_speaker_names[]", "known_speaker_references[]")


def audio_base64(text: str, *, param: str) -> bytes:
    """The bytes of a base64 audio file (or a base64 data: URI)."""
    text = text.strip()
    if text.lower().startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head.lower():
            raise bad_request(f"{param}: a data: URI of audio must be base64-encoded", param=param,
                              code="invalid_audio")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (ValueError, TypeError):
        raise bad_request(f"{param}: not valid base64", param=param, code="invalid_audio") from None
    if not data:
        raise bad_request(f"{param}: the audio data is empty", param=param, code="invalid_audio")
    return data


async def read_transcription_form(request: Request, settings: Settings) -> tuple[dict[str, str], bytes]:
    """The multipart form of /v1/audio/transcriptions: (its text fields, the file's bytes). A field OpenAI's
    endpoint does not have is refused by name."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):  # (the latter: no file)
        raise APIError(415, f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with "
                            "the audio file in the field 'file'", code="unsupported_media_type")
    try:
        form = await request.form(max_files=2, max_fields=32, max_part_size=settings.max_body_bytes)
    except MultiPartException as exc:
        raise bad_request(f"invalid multipart body: {exc.message}", code="invalid_multipart") from None
    except StarletteHTTPException as exc:
        raise bad_request(f"invalid form body: {exc.detail}", code="invalid_multipart") from None
    except (ValueError, KeyError, AssertionError) as exc:
        raise bad_request(f"invalid multipart body: {exc}", code="invalid_multipart") from None
    fields: dict[str, Any] = {}
    for key in form:
        values = form.getlist(key)
        if key == "file":
            continue
        if key not in TRANSCRIPTION_FIELDS:
            raise APIError(400, f"unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
        if any(not isinstance(v, str) for v in values):
            raise bad_request(f"field '{key}' must be text, not a file", param=key)
        fields[key] = values if key.endswith("[]") or key in ("include", "timestamp_granularities") else values[-1]
    upload = form.get("file")
    if upload is None:
        raise APIError(400, "missing required field 'file' (the audio file)", param="file",
                       code="missing_required_parameter")
    if not isinstance(upload, UploadFile):
        raise bad_request("file: send the audio as a file upload, not a text field", param="file",
                          code="invalid_audio")
    data = await upload.read()
    if not data:
        raise bad_request("file: the uploaded file is empty", param="file", code="invalid_audio")
    return fields, data


def check_transcription_options(fields: dict[str, Any]) -> None:
    """Refuse (400, naming the field) what OpenAI's transcription request may ask and this server cannot do."""
    response_format = fields.get("response_format")
    if response_format not in (None, "", *S.TRANSCRIPTION_FORMATS):
        raise _refuse("response_format", f"response_format {response_format!r} is not supported: this server "
                                         f"answers {' or '.join(S.TRANSCRIPTION_FORMATS)} (no timestamps for srt, vtt "
                                         "or verbose_json)")
    if (fields.get("prompt") or "").strip():
        raise _refuse("prompt", "prompt is not supported by this server: its speech model takes no prompt text")
    temperature = fields.get("temperature")
    if temperature not in (None, ""):
        try:
            value = float(temperature)
        except ValueError:
            raise bad_request(f"temperature: not a number (got {temperature!r})", param="temperature") from None
        if value != 0:
            raise _refuse("temperature", f"temperature={value:g}: this server transcribes greedily (only 0)")
    if (fields.get("stream") or "false").strip().lower() not in ("false", "0"):
        raise _refuse("stream", "stream=true: this server returns the whole transcript at once")
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        if fields.get(name):
            raise _refuse(name, f"{name}: this server gives no timestamps")
    for name in ("include[]", "include"):
        if fields.get(name):
            raise _refuse(name, f"{name}: this server returns no logprobs")
    for name in ("chunking_strategy", "known_speaker_names[]", "known_speaker_references[]"):
        if fields.get(name):
            raise _refuse(name, f"{name} is not supported by this server (one window of audio, no speakers)")


# --- the app ------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, vlm=None, embedder=None, speech=None) -> FastAPI:
    """The app for `settings` (models loaded now; model objects passed in are used as they are)."""
    settings = settings or Settings()
    settings.check()
    engine = build_engine(settings, vlm=vlm, embedder=embedder, speech=speech)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(
        title="MultimodalModels server",
        version=_version(),
        description="Image+text AI over HTTP: OpenAI-compatible chat completions (with images) and embeddings "
                    "(texts and images), image search, captions, answers and zero-shot classification.\n\n"
                    "Images are sent as `data:image/...;base64,...` URIs (or multipart uploads on the caption, "
                    "answer and classify endpoints); local paths only inside the server's --image-root folders, "
                    "http(s) URLs only with --allow-remote-images. A chat image part is OpenAI's "
                    "`{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}` or transformers' "
                    "`{\"type\": \"image\", \"url\" | \"path\" | \"base64\": ...}`.\n\n"
                    "Every field of OpenAI's chat request is honoured or refused with a 400 naming it (see each "
                    "field's description); unknown fields are refused on every endpoint.\n\n"
                    "Every response carries an `X-Request-ID` header (the client's own if it sends a sane one: "
                    "1-128 letters, digits or `-_.:`); chat completion ids are `chatcmpl-<request id>`. "
                    "Prometheus metrics are at `/metrics`.\n\n"
                    "Embeddings extension: an `input` item that is a string starting with `data:image/`, or an "
                    "object `{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}`, is an image; it is "
                    "embedded into the same space as the texts.\n\n"
                    "Voice (with --speech-model, a Whisper checkpoint): `POST /v1/audio/transcriptions` is OpenAI's "
                    "speech to text (a multipart upload of a WAV, FLAC, MP3 or OGG file; `response_format` json or "
                    "text). A chat message may hold OpenAI's audio parts, `{\"type\": \"input_audio\", "
                    "\"input_audio\": {\"data\": BASE64, \"format\": \"wav\" | \"mp3\"}}`: the server transcribes "
                    "each with the speech model and puts the transcript in the message in its place, as a text part "
                    "(the VLM reads text and images only). Without a speech model audio parts are refused (400). "
                    "Audio longer than --max-audio-seconds (and the model's 30 s window) is refused.",
        docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.add_middleware(RequestGuard, settings=settings, state=engine)
    app.add_middleware(RequestTracking, metrics=engine.metrics, route_of=functools.partial(route_of, app))

    # -- errors ---------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        if exc.status >= 500:
            log.warning("%s (%s)", exc.message, exc.code)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        error = validation_error(exc)
        return error_response(error.status, error.message, param=error.param, code=error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, code = f"no such endpoint: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    # an unexpected exception becomes a 500 in observe.RequestTracking (logged there with the request id)

    # -- pages ----------------------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html")

    @app.get("/health", response_model=S.Health, tags=["server"])
    async def health():
        """Liveness and load (no API key needed)."""
        index = None
        if engine.index is not None:
            index = {"images": await engine.run(len, engine.index)}
        speech = {"speech": engine.speech.id} if engine.speech else {}  # (named only when served)
        audio = {"max_audio_seconds": engine.max_audio_seconds()} if engine.speech else {}
        return {"status": "ok", "models": {"vlm": engine.vlm.id if engine.vlm else None,
                                           "embedder": engine.embedder.id if engine.embedder else None, **speech},
                "index": index, "busy": engine.active, "max_concurrent": settings.max_concurrent,
                "generation": None if engine.batcher is None else {
                    "decoding": engine.batcher.mode, "running": engine.batcher.admission.in_use,
                    "waiting": engine.batcher.admission.waiting, "max_batch_size": settings.max_batch_size,
                    "max_queue": settings.max_queue},
                "auth": bool(settings.resolved_api_key()),
                "devices": {"vlm": engine.vlm.device if engine.vlm else None,
                            "embedder": engine.embedder.device if engine.embedder else None,
                            **({"speech": engine.speech.device} if engine.speech else {})}, **audio}

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        """Prometheus metrics: requests by route and status, latency histograms, tokens, queue depth,
        generations in flight, errors by code (the API key is needed when one is set)."""
        body, content_type = engine.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=S.ModelList, responses=ERROR_RESPONSES, tags=["openai"])
    async def models():
        """The served models, OpenAI's format (with `kind` added); a model served under several names
        (--served-model-name) is listed once per name."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": m.created, "owned_by": "multimodal-models", "kind": m.kind}
            for m in (engine.vlm, engine.embedder, engine.speech) if m is not None
            for name in (m.aliases or (m.id,))]}

    # -- chat completions -------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, tags=["openai"],
              responses={**ERROR_RESPONSES, 200: {"description": "a chat.completion, or with stream=true "
                                                                 "server-sent chat.completion.chunk events",
                                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def chat_completions(body: S.ChatCompletionRequest):
        """OpenAI's chat completions with images (`image_url` parts), streamed with `stream: true`."""
        served = engine.require("vlm", body.model, what="chat completions")
        check_chat_options(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        messages, sources, audios, chars = [], [], [], 0
        for i, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None:
                if role != "assistant":
                    raise bad_request(f"messages[{i}].content is missing", param=f"messages.{i}.content",
                                      code="missing_required_parameter")
                content = ""
            parts: list[dict] = []
            for j, part in enumerate([S.TextPart(type="text", text=content)] if isinstance(content, str) else content):
                param = f"messages.{i}.content" + ("" if isinstance(content, str) else f".{j}")
                if isinstance(part, S.TextPart):
                    chars += len(check_text(part.text, settings, param=param))
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, S.InputAudioPart):
                    if role != "user":
                        raise bad_request(f"{param}: audio may only be sent in user messages", param=param)
                    if engine.speech is None:
                        raise APIError(400, f"{param}: audio parts need a speech model and this server runs none "
                                            "(start it with --speech-model NAME)", param=param,
                                       code="unsupported_parameter")
                    audios.append((audio_base64(part.input_audio.data, param=f"{param}.input_audio.data"),
                                   f"{param}.input_audio"))
                    parts.append({"type": "audio", "audio": len(audios) - 1})
                else:
                    if role != "user":
                        raise bad_request(f"{param}: images may only be sent in user messages", param=param)
                    sources.append(await image_part_source(part, settings, param=param))
                    parts.append({"type": "image", "image": len(sources) - 1})
            messages.append({"role": role, "content": parts})
        if len(audios) > settings.max_audio_inputs:
            raise APIError(400, f"the request has {len(audios)} audio parts; this server accepts at most "
                                f"{settings.max_audio_inputs}", param="messages", code="too_many_audio_inputs")
        if audios:  # transcribed first (in a worker thread), so that no place in the decode batch waits on them
            transcripts = await engine.run(lambda: [engine.transcribe(data, param=param, source="chat")[0]
                                                    for data, param in audios])
            for message in messages:
                for k, part in enumerate(message["content"]):
                    if part["type"] == "audio":
                        text = transcripts[part["audio"]]
                        chars += len(check_text(text, settings, param=audios[part["audio"]][1]))
                        message["content"][k] = {"type": "text", "text": text}
        if chars > settings.max_prompt_chars:
            raise APIError(400, f"the messages hold {chars:,} characters of text; this server accepts at most "
                                f"{settings.max_prompt_chars:,}", param="messages", code="prompt_too_long")
        check_images(len(sources), settings)
        options = GenerationOptions(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, stop=tuple(stop), seed=body.seed)
        deadline = time.monotonic() + settings.request_timeout_s

        def with_images() -> list[dict]:
            decoded = decode_all(sources, settings)
            for message in messages:
                for part in message["content"]:
                    if part["type"] == "image":
                        part["image"] = decoded[part["image"]]
            return messages

        job = await engine.generate(served, with_images, options, deadline)
        completion_id = f"chatcmpl-{request_id()}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chat_stream(engine, job, completion_id, created, served.id, include_usage),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        text = await finish(engine, job)
        refused = job.finish_reason == "content_filter"
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": served.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None if refused else text,
                                                 "refusal": REFUSAL if refused else None},
                         "logprobs": None, "finish_reason": job.finish_reason}],
            "usage": usage(job), "system_fingerprint": None})

    # -- audio transcriptions ------------------------------------------------------------------

    @app.post("/v1/audio/transcriptions", tags=["openai"], openapi_extra=S.transcription_form_schema(),
              response_model=S.Transcription,
              responses={**ERROR_RESPONSES, 200: {"description": "response_format json: {text, language, usage}; "
                                                                 "text: the text alone (text/plain)",
                                                  "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def transcriptions(request: Request):
        """OpenAI's speech to text: a multipart upload (`file`, `model`, `language`, `response_format`) of a
        WAV, FLAC, MP3 or OGG file, transcribed by the served speech model (--speech-model)."""
        fields, upload = await read_transcription_form(request, settings)
        served = engine.require("speech_to_text", fields.get("model"), what="audio transcriptions")
        check_transcription_options(fields)
        response_format = fields.get("response_format") or "json"
        language = fields.get("language")
        engine.speech_language(language)  # an unknown language: 400 before the audio is read
        text, detected, seconds = await engine.run(engine.transcribe, upload, param="file", language=language,
                                                   source="upload")
        if response_format == "text":
            return Response(text, media_type="text/plain; charset=utf-8")
        return JSONResponse({"text": text, "language": detected,
                             "usage": {"type": "duration", "seconds": round(seconds, 3)}, "model": served.id})

    # -- embeddings ---------------------------------------------------------------------------

    @app.post("/v1/embeddings", response_model=S.EmbeddingResponse, responses=ERROR_RESPONSES, tags=["openai"])
    async def embeddings(body: S.EmbeddingRequest):
        """OpenAI's embeddings, of texts and (extension) images in one space."""
        served = engine.require("dual_encoder", body.model, what="embeddings")
        items = [body.input] if isinstance(body.input, str) else list(body.input)
        if not items:
            raise bad_request("input is an empty list; give at least one text or image", param="input")
        if len(items) > settings.max_embedding_inputs:
            raise bad_request(f"input has {len(items)} items; this server embeds at most "
                              f"{settings.max_embedding_inputs} per request", param="input")
        texts: list[tuple[int, str]] = []
        sources: list[tuple[int, Any]] = []
        for i, item in enumerate(items):
            param = "input" if isinstance(body.input, str) else f"input.{i}"
            if isinstance(item, (int, list)):
                raise bad_request(f"{param}: token-id inputs are not supported; send the text", param=param,
                                  code="unsupported_parameter")
            if isinstance(item, str) and item.strip().lower().startswith("data:image/"):
                sources.append((i, await image_refs.image_source(item, settings, param=param)))
            elif isinstance(item, S.EmbeddingImagePart):
                sources.append((i, await image_refs.image_source(image_url_of(item), settings, param=param)))
            else:
                text = item if isinstance(item, str) else item.text
                if not text.strip():
                    raise bad_request(f"{param} is an empty text", param=param)
                texts.append((i, check_text(text, settings, param=param)))
        check_images(len(sources), settings)
        dim = served.model.config.embed_dim
        if body.dimensions is not None and body.dimensions != dim:
            raise bad_request(f"dimensions={body.dimensions}: this model's embeddings have {dim} dimensions",
                              param="dimensions", code="unsupported_parameter")

        def embed() -> tuple[np.ndarray, int]:
            vectors = np.zeros((len(items), dim), dtype=np.float32)
            tokens = 0
            if texts:
                try:
                    out = served.model.embed_texts([t for _, t in texts])
                except ValueError as exc:
                    raise bad_request(f"input: {exc}", param="input") from None
                vectors[[i for i, _ in texts]] = out.float().numpy()
                tokens += sum(len(ids) for ids in served.model.tokenizer.encode_batch([t for _, t in texts],
                                                                                      add_special_tokens=True))
            if sources:
                decoded = [image_refs.decode(src, settings, param=f"input.{i}") for i, src in sources]
                vectors[[i for i, _ in sources]] = served.model.embed_images(decoded).float().numpy()
            return vectors, tokens

        vectors, tokens = await engine.run(embed)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = [v.tolist() for v in vectors]
        return JSONResponse({"object": "list", "model": served.id,
                             "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- search ---------------------------------------------------------------------------------

    @app.post("/v1/search", response_model=S.SearchResponse, responses=ERROR_RESPONSES, tags=["images"])
    async def search(body: S.SearchRequest):
        """Search the image index by a text, an image, or both: top-k paths, scores, thumbnails."""
        served = engine.require("dual_encoder", body.model, what="search")
        if engine.index is None:
            raise APIError(404, "this server has no image index to search (start it with --index DIR; build one "
                                "with 'multimodal index FOLDER')", code="no_index")
        query = body.query
        if query is not None:
            query = check_text(query, settings, param="query")
            if not query.strip():
                raise bad_request("query is empty", param="query")
        if query is None and body.image is None:
            raise APIError(400, "give a text 'query', an 'image', or both", param="query",
                           code="missing_required_parameter")
        if body.k > settings.max_k:
            raise bad_request(f"k={body.k}: this server returns at most {settings.max_k} results", param="k")
        source = None if body.image is None else await image_refs.image_source(body.image, settings, param="image")
        reranker = None
        if body.rerank:
            if query is None or source is not None:
                raise bad_request("rerank reorders the results of a text query: give a 'query' and no 'image'",
                                  param="rerank")
            reranker = Reranker(engine.require("vlm", None, what="reranking").model)

        def run_search() -> tuple[list[dict], int]:
            image = None if source is None else image_refs.decode(source, settings, param="image")
            if reranker is not None:
                hits = reranker.search(engine.index, served.model, query, k=body.k)
            else:
                hits = engine.index.search(served.model, text=query, image=image, k=body.k)
            root = engine.index.root
            out = []
            for rank, hit in enumerate(hits, 1):
                caption = engine.filter.apply(hit.caption) if hit.caption else hit.caption
                out.append({"rank": rank, "path": hit.path, "score": round(float(hit.score), 6), "caption": caption,
                            "thumbnail": thumbnail(root, hit.path, body.thumbnail_size, settings)
                            if body.thumbnails else None})
            return out, len(engine.index)

        hits, total = await engine.run(run_search)
        return {"object": "list", "data": hits, "model": served.id, "total": total}

    # -- caption, answer, classify --------------------------------------------------------------

    form_generation = {"max_tokens": {"type": "integer", "minimum": 1},
                       "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "model": {"type": "string"}}

    async def generate_about_image(body, source, prompt: str, kind: str):
        served = engine.require("vlm", body.model, what=f"{kind}s")
        check_text(prompt, settings, param="prompt" if kind == "caption" else "question")
        deadline = time.monotonic() + settings.request_timeout_s
        beams = served.model.config.caption_beams if kind == "caption" else 1  # captions as `caption` decodes them
        options = GenerationOptions(max_tokens=body.max_tokens, temperature=body.temperature, num_beams=beams)

        def messages() -> list[dict]:
            image = image_refs.decode(source, settings, param="image")
            return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]

        job = await engine.generate(served, messages, options, deadline)
        text = await finish(engine, job)
        refused = job.finish_reason == "content_filter"
        return {"object": kind, "model": served.id, "text": None if refused else text.strip(),
                "finish_reason": job.finish_reason, "refusal": REFUSAL if refused else None, "usage": usage(job)}

    @app.post("/v1/caption", response_model=S.GenerationResult, responses=ERROR_RESPONSES, tags=["images"],
              openapi_extra=S.json_and_upload_body(S.CaptionRequest, {"prompt": {"type": "string"},
                                                                      **form_generation}))
    async def caption(request: Request):
        """Caption an image: JSON `{"image": "data:image/png;base64,..."}` or a multipart upload.

        Decoded as the model's `caption()` decodes it: with a beam of the model's `caption_beams`
        (4 for shapes-vlm) unless `temperature` asks for sampling."""
        body, source = await read_upload_body(request, S.CaptionRequest, engine)
        return await generate_about_image(body, source, body.prompt or CAPTION_PROMPT, "caption")

    @app.post("/v1/answer", response_model=S.GenerationResult, responses=ERROR_RESPONSES, tags=["images"],
              openapi_extra=S.json_and_upload_body(S.AnswerRequest, {"question": {"type": "string"},
                                                                     **form_generation}))
    async def answer(request: Request):
        """Answer a question about an image: JSON or a multipart upload (fields image, question)."""
        body, source = await read_upload_body(request, S.AnswerRequest, engine)
        if not body.question.strip():
            raise bad_request("question is empty", param="question")
        return await generate_about_image(body, source, body.question, "answer")

    @app.post("/v1/classify", response_model=S.ClassifyResponse, responses=ERROR_RESPONSES, tags=["images"],
              openapi_extra=S.json_and_upload_body(S.ClassifyRequest, {
                  "labels": {"type": "string", "description": "comma-separated labels (or the field repeated)"},
                  "model": {"type": "string"}}))
    async def classify(request: Request):
        """Zero-shot classification of an image over the given labels (label probabilities)."""
        body, source = await read_upload_body(request, S.ClassifyRequest, engine, list_fields=("labels", "templates"))
        served = engine.require("dual_encoder", body.model, what="classification")
        labels = [label.strip() for label in body.labels]
        if len(labels) > settings.max_labels:
            raise bad_request(f"{len(labels)} labels; this server accepts at most {settings.max_labels}", param="labels")
        for i, label in enumerate(labels):
            if not label:
                raise bad_request(f"labels.{i} is empty", param=f"labels.{i}")
            check_text(label, settings, param=f"labels.{i}")
        for i, template in enumerate(body.templates or []):
            check_text(template, settings, param=f"templates.{i}")

        def run_classify():
            image = image_refs.decode(source, settings, param="image")
            return served.model.classify(image, labels, body.templates)

        scores = await engine.run(run_classify)
        data = [{"label": label, "probability": round(float(p), 6)} for label, p in scores]
        return {"object": "classification", "model": served.id, "data": data,
                "best": max(data, key=lambda d: d["probability"])["label"]}

    app.openapi = functools.partial(openapi_schema, app, settings)
    return app


# --- generation helpers ---------------------------------------------------------------------------


def usage(job: GenerationJob) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


async def finish(engine: Engine, job: GenerationJob) -> str:
    """The job's whole text; its deadline is a 504."""
    try:
        text = "".join([piece async for piece in engine.pieces(job)])
    finally:
        if not job.done:  # the request was cancelled while the job ran
            job.cancel()
            engine.executor.submit(job.close)
    if job.finish_reason == "timeout":
        raise APIError(504, f"the request took longer than the server's limit of {engine.settings.request_timeout_s:g} "
                            "seconds; ask for fewer tokens or retry later", code="timeout")
    return text


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def chat_stream(engine: Engine, job: GenerationJob, completion_id: str, created: int, model: str,
                      include_usage: bool):
    """OpenAI's stream: a role delta, content deltas, a finish_reason chunk, [usage], [DONE]."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    try:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        async for piece in engine.pieces(job):
            yield chunk({"content": piece})
        if job.finish_reason == "timeout":
            seconds = engine.settings.request_timeout_s
            engine.metrics.error(200, "timeout")
            log.warning("the stream was cut off at the time limit of %g seconds", seconds)
            yield sse({"error": {"message": f"the stream was cut off at the server's time limit of {seconds:g} seconds",
                                 "type": "timeout_error", "param": None, "code": "timeout"}})
        else:
            if job.finish_reason == "content_filter":
                yield chunk({"refusal": REFUSAL})
            yield chunk({}, job.finish_reason)
            if include_usage:
                yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": None, "choices": [], "usage": usage(job)})
        yield sse("[DONE]")
    finally:
        if not job.done:  # the client went away: stop generating
            job.cancel()
            engine.executor.submit(job.close)


def route_of(app: FastAPI, scope: dict) -> str:
    """The route a request matches, as its path template ("/v1/chat/completions", "/static"), or
    "other": the metrics' labels stay few whatever paths clients make up."""
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "other"


# --- OpenAPI -------------------------------------------------------------------------------------


def openapi_schema(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's schema with OpenAI's error responses (400, not 422) and the API key scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
            if settings.resolved_api_key() and path.startswith("/v1/"):
                operation["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if settings.resolved_api_key():
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema


def _version() -> str:
    return __version__
