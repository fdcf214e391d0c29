"""Image references in requests -> decoded, metadata-free RGB images, safely.

A request names an image as
  - a data: URI ("data:image/png;base64,...") — always accepted;
  - a file: `file:///abs/path.png` or a plain path — only inside the folders given with
    --image-root (symbolic links and '..' are resolved first, so nothing outside them can be
    named); a relative path is looked up in each root in turn;
  - an http(s) URL — refused unless the server runs with --allow-remote-images (the server
    then makes outbound requests for its callers; bounded in size, time and redirects);
  - the bytes of a multipart upload, or (chat's {"type": "image", "base64": ...}) a base64 string.
Decoding goes through `data.images.load_image`: format whitelist, a pixel limit checked
before decoding, EXIF orientation applied and all metadata (GPS included) dropped.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..data.images import load_image
from ..errors import ImageLoadError
from .errors import APIError, bad_request
from .settings import Settings

REMOTE_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3


def parse_data_uri(uri: str, *, param: str) -> bytes:
    """The bytes of a base64 data: URI."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise bad_request(f"{param}: a data: URI needs a ',' before its payload (data:image/png;base64,...)",
                          param=param, code="invalid_image_url")
    media = header[len("data:"):].split(";")
    if "base64" not in (m.strip().lower() for m in media[1:]):
        raise bad_request(f"{param}: only base64 data: URIs are accepted (data:image/png;base64,...)", param=param,
                          code="invalid_image_url")
    if media[0] and not media[0].lower().startswith("image/"):
        raise bad_request(f"{param}: the data: URI holds {media[0]!r}, not an image", param=param,
                          code="invalid_image")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data: URI's payload is not valid base64", param=param,
                          code="invalid_image") from None
    if not data:
        raise bad_request(f"{param}: the data: URI is empty", param=param, code="invalid_image")
    return data


def parse_base64(text: str, *, param: str) -> bytes:
    """The bytes of a base64 string (or of a base64 data: URI)."""
    if text.strip().lower().startswith("data:"):
        return parse_data_uri(text.strip(), param=param)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: not valid base64", param=param, code="invalid_image") from None
    if not data:
        raise bad_request(f"{param}: the image data is empty", param=param, code="invalid_image")
    return data


def local_path(reference: str, settings: Settings, *, param: str) -> Path:
    """The file a file:// URL or path names, if it lies inside an --image-root (else 403)."""
    if not settings.image_roots:
        raise APIError(403, f"{param}: this server reads no local files; send the image as a data: URI (or start "
                            "it with --image-root DIR to allow files inside DIR)", param=param,
                       code="local_images_disabled")
    if reference.lower().startswith("file:"):
        parts = urlsplit(reference)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"{param}: file URLs must name a local file (file:///path), not host "
                              f"{parts.netloc!r}", param=param, code="invalid_image_url")
        reference = unquote(parts.path)
    if "\x00" in reference or not reference.strip():
        raise bad_request(f"{param}: not a valid file path", param=param, code="invalid_image_url")
    roots = [Path(os.path.realpath(Path(r).expanduser())) for r in settings.image_roots]
    given = Path(reference).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if any(real == root or root in real.parents for root in roots):
            if not given.is_absolute() and not real.exists() and candidate is not candidates[-1]:
                continue  # a relative path: try the next root
            return real
    raise APIError(403, f"{param}: {reference!r} is outside the folders this server may read (--image-root)",
                   param=param, code="path_not_allowed")


async def fetch_remote(url: str, settings: Settings, *, param: str) -> bytes:
    if not settings.allow_remote_images:
        raise bad_request(f"{param}: image URLs over http(s) are refused by this server; send the image as a "
                          "data: URI (or start the server with --allow-remote-images)", param=param,
                          code="remote_images_disabled")
    import httpx

    limit = settings.max_remote_image_bytes
    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=True, max_redirects=MAX_REDIRECTS,
                                     trust_env=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad_request(f"{param}: fetching {url} gave HTTP {response.status_code}", param=param,
                                      code="image_fetch_failed")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"{param}: the image at {url} is larger than {limit:,} bytes",
                                       param=param, code="image_too_large")
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise bad_request(f"{param}: could not fetch {url}: {exc}", param=param, code="image_fetch_failed") from None
    return b"".join(chunks)


async def image_source(reference: object, settings: Settings, *, param: str) -> bytes | Path:
    """The encoded bytes (data: URI, remote URL) or the allowed local path an image reference names."""
    if isinstance(reference, (bytes, bytearray)):
        return bytes(reference)
    if not isinstance(reference, str) or not reference.strip():
        raise bad_request(f"{param}: expected an image as a data: URI, URL or path", param=param,
                          code="invalid_image_url")
    reference = reference.strip()
    scheme = reference.split(":", 1)[0].lower() if ":" in reference else ""
    if scheme == "data":
        return parse_data_uri(reference, param=param)
    if scheme in ("http", "https"):
        return await fetch_remote(reference, settings, param=param)
    if scheme == "file" or not scheme or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return local_path(reference, settings, param=param)
    raise bad_request(f"{param}: unsupported URL scheme {scheme!r}; use a data: URI" +
                      (", an http(s) URL" if settings.allow_remote_images else "") +
                      (" or a file path" if settings.image_roots else ""), param=param, code="invalid_image_url")


def decode(source: bytes | Path, settings: Settings, *, param: str) -> Image.Image:
    """Decode in a worker thread: RGB, upright, no metadata, at most max_image_pixels."""
    if isinstance(source, Path):
        try:
            size = source.stat().st_size
        except OSError:
            size = 0
        if size > settings.max_body_bytes:
            raise APIError(413, f"{param}: {source.name} is {size:,} bytes, more than the limit of "
                                f"{settings.max_body_bytes:,}", param=param, code="image_too_large")
    name = param if not isinstance(source, Path) else f"{param} ({source.name})"
    try:
        return load_image(source, max_pixels=settings.max_image_pixels, name=name)
    except ImageLoadError as exc:
        code = "image_too_large" if "max_pixels" in str(exc) else "invalid_image"
        raise bad_request(str(exc), param=param, code=code) from None
