"""What a server is allowed to do: one dataclass, safe by default.

Every limit has a default that a laptop can serve with; `multimodal serve --help` lists the
flags that change them. `check()` refuses the unsafe combinations before anything starts.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MultimodalError

API_KEY_ENV = "MULTIMODAL_API_KEY"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
BLOCKLIST_ACTIONS = ("replace", "refuse")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; anything else (0.0.0.0, a LAN address, a
    host name) may be reachable from other machines."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    model: str | None = "shapes-vlm"  # VLM for chat/caption/answer (name or folder); None: not served
    # dual encoder for embeddings/search/classify; "auto": the index's own model, else shapes-clip; None: not served
    embedder: str | None = "auto"
    dtype: str | None = None  # weights' dtype: "bfloat16" halves the memory; None keeps float32
    device: str = "auto"  # where the models run: cpu, cuda, cuda:N, mps, or auto (the accelerator if any)
    quantize: str | None = None  # "int8": both models' linear layers in int8 on the CPU
    runtime: str = "torch"  # "onnx": the embedder's embeddings by ONNX Runtime (its folder holds an ONNX export)
    adapter: str | None = None  # a LoRA adapter folder (peft's layout) applied to the VLM
    # speech to text (a Whisper checkpoint: name, hub id or folder) for /v1/audio/transcriptions and
    # chat messages' input_audio parts; None: no speech served
    speech_model: str | None = None
    # The names the API reports and accepts for the VLM (the first is reported; default: the
    # model's folder name), and for the embedder
    served_model_name: tuple[str, ...] = ()
    served_embedder_name: tuple[str, ...] = ()
    served_speech_name: tuple[str, ...] = ()
    index: str | None = None  # image index folder for /v1/search (built by `multimodal index`)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required (Authorization: Bearer KEY) on /v1/* when set
    allow_remote_images: bool = False  # fetch http(s) image URLs (the server then makes outbound requests)
    image_roots: tuple[str, ...] = ()  # folders whose files requests may name (file:// URLs or paths)
    # Hosts a browser may call us by (Host header; DNS-rebinding guard). Empty: the loopback names
    # when bound to loopback, anything when bound elsewhere (the API key guards that case).
    allowed_hosts: tuple[str, ...] = ()
    # -- limits ---------------------------------------------------------------------------------
    max_body_bytes: int = 20 * 1024 * 1024  # whole request body (uploads and data: URIs included)
    max_image_pixels: int = 16_000_000  # width*height of one image, checked before decoding
    max_images: int = 8  # images in one request
    max_remote_image_bytes: int = 10 * 1024 * 1024
    max_prompt_chars: int = 8_000  # text characters in one request's messages / question / query
    max_tokens_limit: int = 256  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64  # when a request gives none (cut to what the context leaves)
    default_temperature: float = 0.0  # when a request gives none; 0 is greedy (reproducible answers)
    max_embedding_inputs: int = 256
    # the longest audio transcribed (an upload or a chat audio part); also at most the speech model's
    # window (Whisper's 30 s)
    max_audio_seconds: float = 30.0
    max_audio_inputs: int = 4  # audio parts in one chat request
    max_labels: int = 64
    max_k: int = 100  # search results
    # requests in progress at once, on every endpoint; more get 429 with Retry-After. Generations are
    # limited further by the decode batch and its queue:
    max_concurrent: int = 256
    max_batch_size: int = 16  # sequences decoded side by side (continuous batching); 1: one at a time
    max_queue: int = 64  # generations waiting for a place in the batch; more get 429
    request_timeout_s: float = 60.0  # a request still running then gets 504 (a stream ends with an error event)
    workers: int = 2  # worker threads (the event loop never runs a model; generation has its own two threads)
    torch_threads: int = 1  # torch intra-op threads, set by `run` (not by create_app)
    # -- output filter ------------------------------------------------------------------------
    blocklist: tuple[str, ...] = ()  # words (case-insensitive, whole words) filtered from generated text
    blocklist_action: str = "replace"  # "replace": word -> replacement | "refuse": withhold the response
    blocklist_replacement: str = "***"
    # Extra hook run on all generated text after the blocklist: text -> text (replace) or None (refuse)
    output_filter: Callable[[str], str | None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.image_roots = tuple(str(r) for r in self.image_roots)
        self.blocklist = tuple(w.strip() for w in self.blocklist if w.strip())
        self.allowed_hosts = tuple(self.allowed_hosts)
        self.served_model_name = tuple(self.served_model_name)
        self.served_embedder_name = tuple(self.served_embedder_name)
        self.served_speech_name = tuple(self.served_speech_name)

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def check(self) -> None:
        """Raise MultimodalError for settings that are unsafe or make no sense."""
        if not is_loopback(self.host) and not self.resolved_api_key():
            raise MultimodalError(
                f"refusing to listen on {self.host}: any machine that can reach it could use the models. "
                f"Set an API key (--api-key KEY or the {API_KEY_ENV} environment variable) or bind 127.0.0.1")
        if self.blocklist_action not in BLOCKLIST_ACTIONS:
            raise MultimodalError(f"blocklist action must be one of {BLOCKLIST_ACTIONS}, got {self.blocklist_action!r}")
        for name in ("max_body_bytes", "max_image_pixels", "max_images", "max_prompt_chars", "max_tokens_limit",
                     "default_max_tokens", "max_embedding_inputs", "max_labels", "max_k", "max_concurrent", "workers",
                     "max_batch_size",
                     "max_audio_inputs", "torch_threads", "max_remote_image_bytes"):
            if getattr(self, name) < 1:
                raise MultimodalError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise MultimodalError(f"max_queue must be at least 0, got {self.max_queue}")
        if self.max_audio_seconds <= 0:
            raise MultimodalError(f"max_audio_seconds must be > 0, got {self.max_audio_seconds}")
        if self.request_timeout_s <= 0:
            raise MultimodalError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if not 0 <= self.default_temperature <= 2:
            raise MultimodalError(f"default_temperature must be in [0, 2], got {self.default_temperature}")
        for root in self.image_roots:
            if not Path(root).expanduser().is_dir():
                raise MultimodalError(f"--image-root {root} is not a folder")
        if self.model is None and self.embedder is None and self.speech_model is None:
            raise MultimodalError("nothing to serve: both the VLM and the embedder are disabled")
        for flag, names in (("--served-model-name", self.served_model_name),
                            ("--served-embedder-name", self.served_embedder_name),
                            ("--served-speech-name", self.served_speech_name)):
            for name in names:
                if not isinstance(name, str) or not name.strip() or name != name.strip():
                    raise MultimodalError(f"{flag}: a model name must be a non-empty string without surrounding "
                                          f"spaces, got {name!r}")
        for (flag_a, a), (flag_b, b) in ((("--served-model-name", self.served_model_name),
                                          ("--served-embedder-name", self.served_embedder_name)),
                                         (("--served-model-name", self.served_model_name),
                                          ("--served-speech-name", self.served_speech_name)),
                                         (("--served-embedder-name", self.served_embedder_name),
                                          ("--served-speech-name", self.served_speech_name))):
            if set(a) & set(b):
                raise MultimodalError(f"{flag_a} and {flag_b} share the name(s) {sorted(set(a) & set(b))}")
        if self.quantize not in (None, "int8"):
            raise MultimodalError(f"--quantize: expected int8, got {self.quantize!r}")
        if self.runtime not in ("torch", "onnx"):
            raise MultimodalError(f"--runtime: expected torch or onnx, got {self.runtime!r}")
        from ..devices import resolve_device  # heavy: torch

        try:
            resolve_device(self.device)
        except ValueError as exc:
            raise MultimodalError(str(exc)) from None

    def host_allowed(self, host_header: str) -> bool:
        """Is a request's Host header one we answer? Bound to loopback with no allowed_hosts set,
        only loopback names pass: a web page elsewhere cannot reach the server by DNS rebinding."""
        name = host_header.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1: name.find("]")] if "]" in name else name[1:]
        elif name.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
            name = name.split(":")[0]
        if self.allowed_hosts:
            return "*" in self.allowed_hosts or name in {h.lower().strip("[]") for h in self.allowed_hosts}
        return not is_loopback(self.host) or is_loopback(name)
