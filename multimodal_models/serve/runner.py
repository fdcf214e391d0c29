"""`multimodal serve`: its options, the settings they make, and the uvicorn run.

The options are defined here (not in cli.py) so that the serving flags live next to the
settings they set; importing this module does not import FastAPI.
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys
from pathlib import Path

from ..devices import add_device_arguments, add_runtime_arguments
from ..errors import MultimodalError
from .settings import API_KEY_ENV, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--model", default=d.model,
                        help=f"vision-language model for chat/caption/answer: name or folder, 'none' to serve none "
                             f"(default {d.model})")
    parser.add_argument("--embedder", default=d.embedder,
                        help="dual encoder for embeddings/search/classify: name or folder, 'none' to serve none "
                             "(default: the model that built --index, else shapes-clip)")
    add_device_arguments(parser)  # --device (default auto) and --dtype
    add_runtime_arguments(parser)  # --quantize, --runtime (the embedder's)
    parser.add_argument("--adapter", default=None, metavar="FOLDER",
                        help="a LoRA adapter folder in peft's layout (adapter_config.json + adapter_model.safetensors) "
                             "applied to --model")
    parser.add_argument("--speech-model", default=None, metavar="NAME",
                        help="a Whisper checkpoint (hub id or folder) for POST /v1/audio/transcriptions, chat "
                             "messages' input_audio parts and the web page's microphone (default: none)")
    parser.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                        help="the name(s) the API reports for --model (the first) and accepts in requests' 'model' "
                             "(default: the model's name or folder name)")
    parser.add_argument("--served-embedder-name", nargs="+", default=[], metavar="NAME",
                        help="the same for --embedder")
    parser.add_argument("--served-speech-name", nargs="+", default=[], metavar="NAME",
                        help="the same for --speech-model")
    parser.add_argument("--index", default=None, help="image index for /v1/search (built by 'multimodal index')")
    parser.add_argument("--host", default=d.host,
                        help=f"address to listen on (default {d.host}: this machine only; any other address needs "
                             "an API key)")
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set). "
                             "Prefer the environment variable: a command line is visible to other users")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs given in requests (off: the server makes no outbound "
                             "requests; on, it fetches any URL a caller names, internal addresses included)")
    parser.add_argument("--image-root", action="append", default=[], metavar="DIR",
                        help="a folder whose images requests may name by path or file:// URL (repeatable; "
                             "default none: images come in the request)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host name the server answers to (repeatable; default: loopback names when bound "
                             "to loopback, any otherwise)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                        help=f"largest request body in MiB (default {d.max_body_bytes / 2**20:g})")
    limits.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                        help=f"largest image, width*height (default {d.max_image_pixels:,})")
    limits.add_argument("--max-images", type=int, default=d.max_images,
                        help=f"images per request (default {d.max_images})")
    limits.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                        help=f"text characters per request (default {d.max_prompt_chars:,})")
    limits.add_argument("--max-tokens", type=int, default=d.max_tokens_limit,
                        help=f"largest max_tokens a request may ask for (default {d.max_tokens_limit})")
    limits.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                        help=f"tokens generated when a request gives no max_tokens (default {d.default_max_tokens})")
    limits.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                        help=f"longest audio transcribed, per file or chat audio part (default {d.max_audio_seconds:g}; "
                             "at most the speech model's window, 30 s for Whisper)")
    limits.add_argument("--max-audio-inputs", type=int, default=d.max_audio_inputs,
                        help=f"audio parts per chat request (default {d.max_audio_inputs})")
    limits.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                        help=f"requests in progress at once on all endpoints; more get 429 (default {d.max_concurrent}; "
                             "generations are limited further by --max-batch-size and --max-queue)")
    limits.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                        help=f"generations decoded side by side, sharing each decoding step (continuous batching; "
                             f"1 decodes one at a time; default {d.max_batch_size})")
    limits.add_argument("--max-queue", type=int, default=d.max_queue,
                        help=f"generations waiting for a place in the batch; more get 429 (default {d.max_queue})")
    limits.add_argument("--timeout", type=float, default=d.request_timeout_s,
                        help=f"seconds a request may take: then 504, or a stream ends (default {d.request_timeout_s:g})")
    limits.add_argument("--workers", type=int, default=d.workers,
                        help=f"worker threads: embeddings, search, classification, reading images and prompts "
                             f"(generation runs in its own prefill and decode threads; default {d.workers})")
    limits.add_argument("--threads", type=int, default=d.torch_threads,
                        help=f"torch threads per inference (default {d.torch_threads})")
    output = parser.add_argument_group("output filter")
    output.add_argument("--blocklist", default=None,
                        help="words or phrases to filter from generated text: comma-separated, or @FILE with one a line")
    output.add_argument("--blocklist-action", choices=("replace", "refuse"), default=d.blocklist_action,
                        help="replace each blocked word (default) or withhold the whole response")
    output.add_argument("--blocklist-replacement", default=d.blocklist_replacement,
                        help=f"what replaces a blocked word (default {d.blocklist_replacement!r})")


def _none(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() == "none" else value


def settings_from_args(args: argparse.Namespace) -> Settings:
    blocklist: list[str] = []
    if args.blocklist:
        if args.blocklist.startswith("@"):
            lines = Path(args.blocklist[1:]).read_text(encoding="utf-8").splitlines()
            blocklist = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        else:
            blocklist = [w.strip() for w in args.blocklist.split(",") if w.strip()]
    return Settings(
        model=_none(args.model), embedder=_none(args.embedder), dtype=args.dtype, device=args.device,
        quantize=args.quantize, runtime=args.runtime, adapter=args.adapter, speech_model=_none(args.speech_model),
        served_model_name=tuple(args.served_model_name), served_embedder_name=tuple(args.served_embedder_name),
        served_speech_name=tuple(args.served_speech_name), max_audio_seconds=args.max_audio_seconds,
        max_audio_inputs=args.max_audio_inputs,
        index=args.index, host=args.host, port=args.port,
        api_key=args.api_key, allow_remote_images=args.allow_remote_images, image_roots=tuple(args.image_root),
        allowed_hosts=tuple(args.allowed_host), max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, max_prompt_chars=args.max_prompt_chars,
        max_tokens_limit=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_concurrent=args.max_concurrent, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, request_timeout_s=args.timeout, workers=args.workers,
        torch_threads=args.threads, blocklist=tuple(blocklist), blocklist_action=args.blocklist_action,
        blocklist_replacement=args.blocklist_replacement)


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return f"http://[{shown}]:{port}" if ":" in shown and not shown.startswith("[") else f"http://{shown}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket, made with proto=IPPROTO_TCP: asyncio turns Nagle's algorithm off
    (TCP_NODELAY) only on connections whose socket says so, and with Nagle on, each streamed
    token waits for the client's delayed ACK (~40 ms) on a kept-alive connection."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise MultimodalError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def log_config() -> dict:
    """uvicorn's logging set-up, with the request id in every line ("-" outside a request) and the
    server's own access log (observe.py: it carries the id) in place of uvicorn's."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "multimodal_models.serve.observe.RequestIdFilter"}}
    config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(message)s"
    config["handlers"]["default"]["filters"] = ["request_id"]
    config["loggers"]["multimodal_models.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def run(settings: Settings) -> None:
    """Check the settings, load the models, bind, print the address, serve until Ctrl-C."""
    settings.check()  # before loading anything: an unsafe address is refused at once
    import torch
    import uvicorn

    # heavy: FastAPI and torch; `multimodal --help` imports this module for add_arguments
    from .app import create_app

    torch.set_num_threads(settings.torch_threads)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", server_header=False,
                            timeout_graceful_shutdown=5, log_config=log_config(), access_log=False)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url = url_of(settings.host, port)
    engine = app.state.engine
    served = ", ".join(f"{m.kind} {m.id} on {m.device}" for m in (engine.vlm, engine.embedder, engine.speech)
                       if m is not None)
    print(f"multimodal serve: {url}/  (API docs: {url}/docs; serving {served}"
          f"{'; index of ' + str(len(engine.index)) + ' images' if engine.index is not None else ''}"
          f"{'; API key required' if settings.resolved_api_key() else ''})", flush=True)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"multimodal serve: listening on {settings.host}: reachable from other machines", file=sys.stderr)
    uvicorn.Server(config).run(sockets=[sock])


def run_from_args(args: argparse.Namespace) -> None:
    run(settings_from_args(args))
