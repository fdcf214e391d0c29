"""Serving: an HTTP API (OpenAI-compatible chat completions, embeddings and audio transcriptions,
image search, captions, answers, zero-shot classification) and a web page, on FastAPI + uvicorn.

    multimodal serve                               # http://127.0.0.1:8000/  (docs at /docs)
    multimodal serve --index photos/ --image-root photos/
    multimodal serve --speech-model openai/whisper-tiny   # voice: /v1/audio/transcriptions, input_audio
    MULTIMODAL_API_KEY=... multimodal serve --host 0.0.0.0

    from multimodal_models.serve import Settings, create_app
    app = create_app(Settings(model="path/to/vlm", embedder="path/to/clip", index="photos/"))

Safe by default: loopback only unless an API key is set; limits on body size, image
pixels, prompt length, max_tokens, concurrent requests and request time; no local files
outside --image-root, no remote URLs unless allowed; image metadata never returned; an
output filter (blocklist + hook). See `settings.py` for every limit and `guards.py` for the
checks each request passes.

This module imports FastAPI only when `create_app` or `run` is called, so the rest of the
package (and `multimodal --help`) works without the serving dependencies.
"""

from __future__ import annotations

from .runner import run
from .settings import API_KEY_ENV, Settings, is_loopback


def create_app(settings: Settings | None = None, **models):
    # heavy: FastAPI and torch load on first use, not on import
    from .app import create_app as _create_app

    return _create_app(settings, **models)


__all__ = ["API_KEY_ENV", "Settings", "create_app", "is_loopback", "run"]
