"""Chat messages with images in every form people send them, from Python (`model.chat`):
transformers' content parts (image / path / url / base64) and OpenAI's image_url parts.
The server's side of the same forms is in test_serve_interfaces.py."""

from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from PIL import Image

import multimodal_models
from multimodal_models.errors import ImageLoadError
from multimodal_models.models.chat import attach_images, normalize_messages, remote_images, resolve_image_part

torch.set_num_threads(1)
SHIPPED = Path(__file__).parent / "fixtures" / "shipped"
QUESTION = {"type": "text", "text": "describe the image."}


@pytest.fixture(scope="module")
def vlm():
    return multimodal_models.load("shapes-vlm")


def scene(k: int) -> Path:
    return sorted(SHIPPED.glob("*.png"))[k]


def ask(model, part: dict, **options) -> str:
    return model.chat([{"role": "user", "content": [part, QUESTION]}], max_new_tokens=12, **options)


def every_form(path: Path) -> dict[str, dict]:
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    return {
        "path": {"type": "image", "path": str(path)},
        "url (a path)": {"type": "image", "url": str(path)},
        "url (file://)": {"type": "image", "url": path.resolve().as_uri()},
        "url (data:)": {"type": "image", "url": "data:image/png;base64," + b64},
        "base64": {"type": "image", "base64": b64},
        "image (PIL)": {"type": "image", "image": Image.open(path)},
        "image (bytes)": {"type": "image", "image": data},
        "image (a path)": {"type": "image", "image": str(path)},
        "image_url": {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
        "image_url (a string)": {"type": "image_url", "image_url": str(path)},
    }


def test_every_form_of_image_part_gives_the_answer_of_the_image_itself(vlm):
    expected = vlm.chat([{"role": "user", "content": [{"type": "image"}, QUESTION]}], images=[Image.open(scene(0))],
                        max_new_tokens=12)
    answers = {name: ask(vlm, part) for name, part in every_form(scene(0)).items()}
    assert answers == {name: expected for name in answers}
    assert ask(vlm, {"type": "image", "path": str(scene(1))}) != expected  # the image is really read


def test_named_images_do_not_take_from_the_images_given_beside(vlm):
    messages = [{"role": "user", "content": [{"type": "image", "path": str(scene(0))}, {"type": "image"},
                                             QUESTION]}]
    attached = attach_images(messages, [Image.open(scene(1))])
    images = [part["image"] for part in attached[0]["content"] if part["type"] == "image"]
    assert [image.tobytes() for image in images] == [Image.open(scene(k)).convert("RGB").tobytes() for k in (0, 1)]
    assert isinstance(vlm.chat(messages, images=[scene(1)], max_new_tokens=3), str)
    with pytest.raises(ValueError, match=r"more image parts than images were given: messages\[0\].content\[1\]"):
        vlm.chat(messages)
    with pytest.raises(ValueError, match="no place"):
        vlm.chat(messages, images=[scene(1), scene(2)])
    # the templates read the forms directly too (normalize_messages is what the word template encodes)
    (_, parts), = normalize_messages([{"role": "user", "content": [{"type": "image_url",
                                                                      "image_url": {"url": str(scene(2))}}]}])
    assert parts[0]["type"] == "image" and parts[0]["image"].size == Image.open(scene(2)).size


class _Images(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[str]] = []

    def do_GET(self):  # noqa: N802
        self.requests.append(self.path)
        data = self.files.get(self.path)
        self.send_response(200 if data else 404)
        self.send_header("content-length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


def test_remote_images_are_fetched_only_inside_remote_images(vlm):
    _Images.files, _Images.requests = {"/scene.png": scene(0).read_bytes()}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/scene.png"
    try:
        for part in ({"type": "image", "url": url}, {"type": "image", "image": url},
                     {"type": "image_url", "image_url": {"url": url}}):
            with pytest.raises(ValueError, match=r"messages\[0\].content\[0\].*remote image.*remote_images\(\)"):
                ask(vlm, part)
        assert _Images.requests == []  # no request was made
        expected = ask(vlm, {"type": "image", "path": str(scene(0))})
        with remote_images():
            assert ask(vlm, {"type": "image", "url": url}) == expected
            assert ask(vlm, {"type": "image_url", "image_url": {"url": url}}) == expected
            with pytest.raises(ValueError, match="could not fetch the image at .*: HTTP 404"):
                ask(vlm, {"type": "image", "url": url.replace("scene", "missing")})
        assert _Images.requests == ["/scene.png", "/scene.png", "/missing.png"]
        fetched = []
        with remote_images(lambda u: fetched.append(u) or scene(0).read_bytes()):  # the caller's own fetcher
            assert ask(vlm, {"type": "image", "url": "https://example.com/a.png"}) == expected
        assert fetched == ["https://example.com/a.png"]
    finally:
        server.shutdown()


@pytest.mark.parametrize("part, error, words", [
    ({"type": "image", "path": "x.png", "url": "y.png"}, ValueError, "carries one image, this one has path and url"),
    ({"type": "image", "base64": "@@not base64@@"}, ValueError, "content[0].base64: not valid base64"),
    ({"type": "image", "base64": "aGVsbG8="}, ImageLoadError, "not an image"),
    ({"type": "image", "url": "data:image/png,raw"}, ValueError, "only base64 data: URIs"),
    ({"type": "image", "url": "ftp://example.com/a.png"}, ValueError, "unsupported URL scheme 'ftp'"),
    ({"type": "image", "url": "file://otherhost/a.png"}, ValueError, "local file"),
    ({"type": "image", "path": ""}, ValueError, "content[0].path must be a non-empty string"),
    ({"type": "image", "path": "/no/such/file.png"}, ImageLoadError, "/no/such/file.png"),
    ({"type": "image_url", "image_url": {"detail": "low"}}, ValueError, "image_url part needs"),
    ({"type": "audio", "audio": "x.wav"}, ValueError, "'text'|'image'|'image_url'"),
])
def test_bad_image_parts_are_errors_naming_the_part(vlm, part, error, words):
    with pytest.raises(error) as raised:
        ask(vlm, part)
    assert words in str(raised.value)
    if error is ValueError and part["type"] != "audio":
        with pytest.raises(error, match="messages.0..content.0."):
            resolve_image_part(part, where="messages[0].content[0]")
