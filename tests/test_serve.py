"""The HTTP server: every endpoint and error path (TestClient), the official `openai` client
against a real uvicorn server, 32 concurrent clients, safety defaults, the output filter,
and the API fuzzed from its own OpenAPI schema (schemathesis).

All models are tiny random ones built and saved here (their words are nonsense, but
greedy decoding is deterministic, which is what the comparisons need).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal_models.data.preprocess import ImageProcessor
from multimodal_models.data.tokenizer import WordTokenizer
from multimodal_models.errors import MultimodalError
from multimodal_models.index.defaults import DEFAULT_SIMILARITY_WEIGHT
from multimodal_models.loading import load
from multimodal_models.models.chat import CHAT_SPECIAL_TOKENS
from multimodal_models.models.dual_encoder import DualEncoder, DualEncoderConfig
from multimodal_models.shapes.models import SHAPES_TEMPLATES
from multimodal_models.models.text import DecoderConfig, TextEncoderConfig
from multimodal_models.models.vision import VisionConfig
from multimodal_models.models.vlm import VisionLanguageModel, VLMConfig

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from multimodal_models.serve import Settings, create_app  # noqa: E402
from multimodal_models.serve.generation import FilteredStream, OutputFilter  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
WORDS = ("is there a red blue green yellow circle square star triangle what color shape size yes no two one "
         "describe the image . ? an of with and")
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}
QUESTIONS = ["describe the image.", "what color is the circle?", "is there a red star?", "what shape is it?",
             "how many squares are there?", "is there a blue circle?", "what size is the star?", "describe it."]


# --- tiny models, images, an index --------------------------------------------------------------


def tiny_vlm(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    tokenizer = WordTokenizer.train([WORDS], extra_special_tokens=CHAT_SPECIAL_TOKENS)
    config = VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, pool="mean", class_token=False),
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, width=32, depth=2, heads=2, max_length=96),
        pixel_shuffle=2, image_token_id=tokenizer.image_id)
    model = VisionLanguageModel(config).eval()
    with torch.no_grad():  # larger random weights, so that answers depend on the image and do not stop at once
        for p in model.parameters():
            p.mul_(6)
        model.decoder.lm_head.weight[tokenizer.eos_id] -= 2.0
        model.decoder.lm_head.weight[tokenizer.token_to_id("<user>")] -= 2.0
    model.tokenizer = tokenizer
    model.image_processor = ImageProcessor(size={"height": 32, "width": 32})
    return model


def tiny_clip(seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    tokenizer = WordTokenizer.train([WORDS] + [t.format("x") for t in SHAPES_TEMPLATES])
    model = DualEncoder(DualEncoderConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=24, width=32, depth=1, heads=2),
        embed_dim=16))
    model.tokenizer = tokenizer
    model.image_processor = ImageProcessor(size={"height": 32, "width": 32})
    return model.eval()


def shapes_image(colour: str, shape: str = "circle", size: int = 48) -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def jpeg_with_gps(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}  # GPSInfo
    data = encode(image, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825), "the test image should carry GPS"
    return data


def image_messages(uri: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    vlm_dir = tiny_vlm().save_pretrained(root / "tiny-vlm")
    clip_dir = tiny_clip().save_pretrained(root / "tiny-clip")
    photos = root / "photos"
    (photos / "nested").mkdir(parents=True)
    for colour in ("red", "green", "blue"):
        shapes_image(colour).save(photos / f"{colour}.png")
    shapes_image("yellow", "square").save(photos / "nested" / "yellow.png")
    (photos / "gps.jpg").write_bytes(jpeg_with_gps(shapes_image("blue", "square")))
    (root / "secret.png").write_bytes(encode(shapes_image("red")))  # outside the image root
    os.symlink(root / "secret.png", photos / "link-out.png")
    from multimodal_models.index import ImageIndex

    with ImageIndex.open(root / "index", create=True) as index:
        index.update(photos, load(clip_dir), model_name=str(clip_dir), progress=False)
    return {"root": root, "vlm": vlm_dir, "clip": clip_dir, "photos": photos, "index": root / "index",
            "red": encode(shapes_image("red")), "blue": encode(shapes_image("blue", "square"))}


def make_settings(env, **overrides) -> Settings:
    values = dict(model=str(env["vlm"]), embedder=str(env["clip"]), index=str(env["index"]),
                  image_roots=(str(env["photos"]),), max_tokens_limit=24, default_max_tokens=8)
    values.update(overrides)
    return Settings(**values)


def make_client(env, **overrides) -> TestClient:
    return TestClient(create_app(make_settings(env, **overrides)), base_url="http://localhost")


@pytest.fixture(scope="module")
def client(env):
    return make_client(env)


@pytest.fixture(scope="module")
def models(client):
    engine = client.app.state.engine
    return engine.vlm.model, engine.embedder.model


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def read_sse(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


# --- basics ---------------------------------------------------------------------------------------


def test_health_models_page_and_docs(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == {"vlm": "tiny-vlm", "embedder": "tiny-clip"}
    assert health["index"] == {"images": 6} and health["auth"] is False
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert {(m["id"], m["kind"], m["object"]) for m in models["data"]} == {("tiny-vlm", "vlm", "model"),
                                                                           ("tiny-clip", "dual_encoder", "model")}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "http" not in page.text.split("<body>")[0].replace("http-equiv", "")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css", "docs.js"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "/static/docs.js" in client.get("/docs").text
    schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/embeddings", "/v1/search", "/v1/caption", "/v1/answer", "/v1/classify",
            "/v1/models", "/health"} <= set(schema["paths"])
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses and {"400", "413", "429", "504"} <= set(responses)
    caption_body = schema["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} == set(caption_body)
    # no external resources anywhere in the static files
    for path in (REPO / "multimodal_models/serve/static").iterdir():
        assert "https://" not in path.read_text() and "cdn" not in path.read_text().lower(), path


# --- chat completions -----------------------------------------------------------------------------


def test_chat_completion_with_an_image_matches_the_model(client, env, models):
    vlm, _ = models
    body = {"model": "tiny-vlm", "messages": image_messages(data_uri(env["red"]), "describe the image."),
            "max_tokens": 10}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "tiny-vlm"
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    expected = vlm.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}],
                        images=[Image.open(io.BytesIO(env["red"]))], max_new_tokens=10)
    assert choice["message"]["content"] == expected and expected
    usage = out["usage"]
    assert usage["completion_tokens"] == 10 and choice["finish_reason"] == "length"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 4
    # another image gives another answer: the image is really used
    other = client.post("/v1/chat/completions", json={**body, "messages": image_messages(data_uri(env["blue"]),
                                                                                         "describe the image.")})
    assert other.json()["choices"][0]["message"]["content"] != expected


def test_streamed_chat_is_openai_chunks_and_equals_the_whole_answer(client, env):
    body = {"messages": image_messages(data_uri(env["red"]), "what color is the circle?"), "max_tokens": 12}
    whole = client.post("/v1/chat/completions", json=body).json()
    response = client.post("/v1/chat/completions", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = read_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(contents) > 1
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert finals[0]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert streamed_text(events) == whole["choices"][0]["message"]["content"]


def test_chat_options_stop_sampling_turns_and_system(client, env):
    uri = data_uri(env["red"])
    base = {"messages": image_messages(uri, "describe the image."), "max_tokens": 12}
    full = client.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) >= 3
    cut = client.post("/v1/chat/completions", json={**base, "stop": words[2]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and full.startswith(cut["message"]["content"])
    assert words[2] not in cut["message"]["content"].split()[2:]
    listed = client.post("/v1/chat/completions", json={**base, "stop": ["zzz", words[2]]}).json()["choices"][0]
    assert listed["message"]["content"] == cut["message"]["content"]
    sampled = [client.post("/v1/chat/completions", json={**base, "temperature": 1.5, "top_p": 0.9, "seed": 3}).json()
               for _ in range(2)]
    assert sampled[0]["choices"][0]["message"]["content"] == sampled[1]["choices"][0]["message"]["content"]
    turns = [{"role": "system", "content": "describe the image."}, *image_messages(uri, "what color?"),
             {"role": "assistant", "content": "red"}, {"role": "user", "content": "what shape?"}]
    reply = client.post("/v1/chat/completions", json={"messages": turns, "max_completion_tokens": 4})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4
    text_only = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "is there a star?"}]})
    assert text_only.status_code == 200 and text_only.json()["usage"]["completion_tokens"] <= 8  # the default budget


@pytest.mark.parametrize("body, status, param, words", [
    ({"n": 2}, 400, "n", "n=1"),
    ({"max_tokens": 25}, 400, "max_tokens", "at most 24"),
    ({"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": "gpt-4o"}, 404, "model", "not served here"),
    ({"model": "tiny-clip"}, 400, "model", "needs a vision-language model"),
    ({"tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ({"logprobs": True}, 400, "logprobs", "not supported"),
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"messages": None}, 400, "messages", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "robot"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content", "missing"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, 400, "messages.0.content.0", "audio"),
    ({"messages": [{"role": "user", "content": "a <image> b"}]}, 400, "messages.0.content", "<image>"),
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, 400, "messages.0.content", "at most 8,000"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     400, "messages.0.content.0", "user messages"),
])
def test_chat_request_errors_say_what_is_wrong(client, env, body, status, param, words):
    request = {"messages": image_messages(data_uri(env["red"]), "describe the image."), "max_tokens": 4, **body}
    if body.get("messages", 1) is None:
        del request["messages"]
    error = error_of(client.post("/v1/chat/completions", json=request), status)
    assert error["param"] == param and words in error["message"], error


def test_chat_context_images_and_json_errors(client, env):
    uri = data_uri(env["red"])
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 9 + [
        {"type": "text", "text": "describe"}]}]
    assert error_of(client.post("/v1/chat/completions", json={"messages": many}), 400)["code"] == "too_many_images"
    # 8 images * 4 tokens + text fit 96 tokens, but not with 60 new tokens on top
    long = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 8 + [
        {"type": "text", "text": "describe the image . " * 12}]}]
    error = error_of(client.post("/v1/chat/completions", json={"messages": long, "max_tokens": 24}), 400)
    assert error["code"] == "context_length_exceeded" and "at most" in error["message"]
    bad = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert error_of(bad, 400)["message"]
    array = client.post("/v1/chat/completions", json=[1, 2])
    assert error_of(array, 400)


# --- images in requests -----------------------------------------------------------------------------


def chat_about(client, url: str):
    return client.post("/v1/chat/completions", json={"messages": image_messages(url, "describe the image."),
                                                      "max_tokens": 3})


def test_image_references_are_checked(client, env):
    photos = env["photos"]
    truncated = env["red"][: len(env["red"]) // 2]
    huge = encode(Image.new("RGB", (5000, 4000)))  # 20 MP > the 16 MP default
    cases = [
        ("data:image/png;base64,@@@", 400, "invalid_image", "not valid base64"),
        ("data:image/png,rawbytes", 400, "invalid_image_url", "base64"),
        ("data:text/plain;base64,aGVsbG8=", 400, "invalid_image", "not an image"),
        (data_uri(b"hello, not an image"), 400, "invalid_image", "not an image"),
        (data_uri(truncated), 400, "invalid_image", "truncated"),
        (data_uri(huge), 400, "image_too_large", "max_pixels"),
        ("https://example.com/cat.png", 400, "remote_images_disabled", "--allow-remote-images"),
        ("ftp://example.com/cat.png", 400, "invalid_image_url", "unsupported URL scheme"),
        (str(env["root"] / "secret.png"), 403, "path_not_allowed", "outside"),
        (str(photos / ".." / "secret.png"), 403, "path_not_allowed", "outside"),
        ("../secret.png", 403, "path_not_allowed", "outside"),
        ("file://" + str(photos / "%2E%2E" / "secret.png"), 403, "path_not_allowed", "outside"),
        ("link-out.png", 403, "path_not_allowed", "outside"),  # a symbolic link pointing out of the root
        ("file://otherhost/etc/passwd", 400, "invalid_image_url", "local file"),
        ("missing.png", 400, "invalid_image", "no such file"),
    ]
    for url, status, code, words in cases:
        error = error_of(chat_about(client, url), status)
        assert error["code"] == code and words in error["message"], (url, error)
        assert error["param"] == "messages.0.content.0.image_url"
        assert str(env["root"]) not in error["message"] or status == 403, error  # no server paths in messages
    for url in (str(photos / "red.png"), "file://" + str(photos / "red.png"), "red.png", "nested/yellow.png"):
        assert chat_about(client, url).status_code == 200, url
    expected = chat_about(client, data_uri(env["red"])).json()["choices"][0]["message"]["content"]
    assert chat_about(client, "red.png").json()["choices"][0]["message"]["content"] == expected
    no_roots = make_client(env, image_roots=())
    assert error_of(chat_about(no_roots, "red.png"), 403)["code"] == "local_images_disabled"


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        self.send_response(200 if data else 404)
        self.send_header("content-length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


def test_remote_images_only_when_allowed(env):
    _ImageHandler.files = {"/red.png": env["red"], "/big.png": env["red"] + b"\0" * 5000}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        client = make_client(env, allow_remote_images=True, max_remote_image_bytes=4000)
        remote = chat_about(client, f"{base}/red.png")
        assert remote.status_code == 200, remote.text
        local = chat_about(client, data_uri(env["red"]))
        assert remote.json()["choices"][0]["message"]["content"] == local.json()["choices"][0]["message"]["content"]
        assert error_of(chat_about(client, f"{base}/missing.png"), 400)["code"] == "image_fetch_failed"
        assert error_of(chat_about(client, f"{base}/big.png"), 413)["code"] == "image_too_large"
    finally:
        server.shutdown()


# --- embeddings ---------------------------------------------------------------------------------------


def test_embeddings_of_texts_and_images(client, env, models):
    _, clip = models
    one = client.post("/v1/embeddings", json={"input": "a red circle", "model": "tiny-clip"}).json()
    assert one["object"] == "list" and one["model"] == "tiny-clip" and len(one["data"]) == 1
    assert one["data"][0]["object"] == "embedding" and one["data"][0]["index"] == 0
    np.testing.assert_allclose(one["data"][0]["embedding"], clip.embed_texts(["a red circle"])[0].numpy(), atol=1e-5)
    assert one["usage"]["prompt_tokens"] == len(clip.tokenizer.encode("a red circle", add_special_tokens=True))
    uri = data_uri(env["red"])
    mixed = client.post("/v1/embeddings", json={"input": ["two stars", uri, {"type": "image_url", "image_url": {"url": uri}},
                                                          {"type": "text", "text": "a blue square"}]}).json()
    vectors = np.array([d["embedding"] for d in mixed["data"]])
    assert [d["index"] for d in mixed["data"]] == [0, 1, 2, 3]
    image_vector = clip.embed_images([Image.open(io.BytesIO(env["red"]))])[0].numpy()
    np.testing.assert_allclose(vectors[1], image_vector, atol=1e-5)
    np.testing.assert_allclose(vectors[2], image_vector, atol=1e-5)
    np.testing.assert_allclose(vectors[3], clip.embed_texts(["a blue square"])[0].numpy(), atol=1e-5)
    packed = client.post("/v1/embeddings", json={"input": ["two stars", uri], "encoding_format": "base64"}).json()
    unpacked = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]])
    np.testing.assert_allclose(unpacked, vectors[:2], atol=1e-6)


@pytest.mark.parametrize("body, param, words", [
    ({"input": []}, "input", "empty list"),
    ({"input": ""}, "input", "empty text"),
    ({"input": [[1, 2, 3]]}, "input.0", "token-id"),
    ({"input": ["a", 5]}, "input.1", "token-id"),
    ({"input": "a", "dimensions": 8}, "dimensions", "16 dimensions"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format", "float"),
    ({"input": "red " * 40}, "input", "at most 24"),
    ({"input": ["a"] * 300}, "input", "at most 256"),
    ({"input": "a", "model": "tiny-vlm"}, "model", "dual encoder"),
    ({"input": ["data:image/png;base64,AAAA"]}, "input.0", "not an image"),
    ({}, "input", "missing"),
])
def test_embedding_errors(client, body, param, words):
    error = error_of(client.post("/v1/embeddings", json=body), 404 if body.get("model") == "x" else 400)
    assert error["param"] == param and words in error["message"], error


# --- search ---------------------------------------------------------------------------------------------


def test_search_by_text_and_image_with_clean_thumbnails(client, env, models):
    _, clip = models
    out = client.post("/v1/search", json={"query": "a red circle", "k": 3}).json()
    assert out["object"] == "list" and out["total"] == 6 and len(out["data"]) == 3
    assert [h["rank"] for h in out["data"]] == [1, 2, 3]
    assert out["data"][0]["score"] >= out["data"][1]["score"] >= out["data"][2]["score"]
    everything = client.post("/v1/search", json={"query": "a red circle", "k": 10}).json()["data"]
    assert {h["path"] for h in everything} == {"red.png", "green.png", "blue.png", "nested/yellow.png", "gps.jpg",
                                               "link-out.png"}
    for hit in everything:
        if hit["path"] == "link-out.png":  # points outside the indexed folder: no thumbnail of it is served
            assert hit["thumbnail"] is None
            continue
        assert hit["thumbnail"].startswith("data:image/png;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(hit["thumbnail"].split(",", 1)[1])))
        assert max(thumb.size) <= 128 and not thumb.getexif() and not thumb.info.get("exif")
        assert all(key not in thumb.info for key in ("exif", "xmp", "icc_profile", "XML:com.adobe.xmp"))
    by_image = client.post("/v1/search", json={"image": data_uri(env["blue"]), "k": 1}).json()["data"]
    assert by_image[0]["path"] == "gps.jpg" and by_image[0]["score"] > 0.99  # same pixels, metadata aside
    both = client.post("/v1/search", json={"query": "blue", "image": "red.png", "k": 2, "thumbnails": False}).json()
    assert both["data"][0]["thumbnail"] is None
    small = client.post("/v1/search", json={"query": "red", "k": 1, "thumbnail_size": 16}).json()["data"][0]
    assert max(Image.open(io.BytesIO(base64.b64decode(small["thumbnail"].split(",", 1)[1]))).size) <= 16
    assert error_of(client.post("/v1/search", json={}), 400)["code"] == "missing_required_parameter"
    assert error_of(client.post("/v1/search", json={"query": "  "}), 400)["param"] == "query"
    assert "at most 100" in error_of(client.post("/v1/search", json={"query": "red", "k": 101}), 400)["message"]
    assert error_of(client.post("/v1/search", json={"query": "red", "k": 0}), 400)["param"] == "k"
    no_index = make_client(env, index=None)
    assert error_of(no_index.post("/v1/search", json={"query": "red"}), 404)["code"] == "no_index"


def test_search_reranked_by_the_served_vlm(client, env, models):
    vlm, clip = models
    out = client.post("/v1/search", json={"query": "a red circle", "k": 3, "rerank": True, "thumbnails": False}).json()
    hits = out["data"]
    assert len(hits) == 3 and out["total"] == 6
    # all six images are rescored (the top 10 of six): the VLM's likelihood + 20 x the cosine; the best three come back
    paths = ["red.png", "green.png", "blue.png", "nested/yellow.png", "gps.jpg", "link-out.png"]
    images = [Image.open(env["photos"] / p).convert("RGB") for p in paths]
    likelihood = vlm.text_log_likelihoods(["a red circle"] * 6, vlm.image_features(vlm.image_processor(images)))
    cosine = torch.as_tensor(np.asarray(clip.embed_images(images)) @ np.asarray(clip.embed_texts(["a red circle"]))[0])
    score = likelihood + DEFAULT_SIMILARITY_WEIGHT * cosine.float()
    best = score.argsort(descending=True)[:3].tolist()
    assert [h["path"] for h in hits] == [paths[i] for i in best]
    assert [h["score"] for h in hits] == pytest.approx([float(score[i]) for i in best], abs=1e-3)
    both = client.post("/v1/search", json={"query": "red", "image": "red.png", "rerank": True})
    assert error_of(both, 400)["param"] == "rerank"
    no_vlm = make_client(env, model=None)
    assert error_of(no_vlm.post("/v1/search", json={"query": "red", "rerank": True}), 404)["code"] == "model_not_found"


def test_the_index_must_match_the_embedder(env, tmp_path):
    other = tiny_clip(seed=1).save_pretrained(tmp_path / "other-clip")
    with pytest.raises(MultimodalError, match="different space"):
        create_app(make_settings(env, embedder=str(other)))
    auto = create_app(make_settings(env, embedder="auto"))  # the index names its own model
    assert auto.state.engine.embedder.id == "tiny-clip"


# --- caption, answer, classify ------------------------------------------------------------------------


def test_caption_answer_and_classify_by_upload_and_by_json(client, env, models):
    vlm, clip = models
    red = env["red"]
    upload = client.post("/v1/caption", files={"image": ("red.png", red, "image/png")}, data={"max_tokens": "6"})
    by_json = client.post("/v1/caption", json={"image": data_uri(red), "max_tokens": 6})
    assert upload.status_code == by_json.status_code == 200, upload.text
    assert upload.json() == by_json.json()
    result = upload.json()
    assert result["object"] == "caption" and result["model"] == "tiny-vlm" and result["text"]
    assert result["text"] == vlm.caption(Image.open(io.BytesIO(red)), max_new_tokens=6).strip()
    image = Image.open(io.BytesIO(red))
    # the served model's caption decoding is the one the API uses: a beam width that finds another caption
    width = next(w for w in range(2, 9) if vlm.caption(image, num_beams=w, max_new_tokens=12) !=
                 vlm.caption(image, num_beams=1, max_new_tokens=12))
    vlm.config.caption_beams = width
    try:
        beams = client.post("/v1/caption", json={"image": data_uri(red), "max_tokens": 12}).json()["text"]
        assert beams == vlm.caption(image, max_new_tokens=12).strip() == vlm.caption(image, num_beams=width,
                                                                                      max_new_tokens=12).strip()
        sampled = client.post("/v1/caption", json={"image": data_uri(red), "max_tokens": 6, "temperature": 1.0})
        assert sampled.status_code == 200  # sampling decodes token by token, beams or not
    finally:
        vlm.config.caption_beams = 1
    answer = client.post("/v1/answer", files={"image": ("red.png", red, "image/png")},
                         data={"question": "what color is the circle?", "max_tokens": "5"}).json()
    assert answer["object"] == "answer"
    assert answer["text"] == vlm.ask(Image.open(io.BytesIO(red)), "what color is the circle?", max_new_tokens=5).strip()
    labels = ["a red circle", "a blue square", "a green star"]
    scores = client.post("/v1/classify", json={"image": data_uri(red), "labels": labels}).json()
    assert [d["label"] for d in scores["data"]] == labels
    assert abs(sum(d["probability"] for d in scores["data"]) - 1) < 1e-4
    expected = clip.classify(Image.open(io.BytesIO(red)), labels)
    assert [d["probability"] for d in scores["data"]] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert scores["best"] == max(expected, key=lambda x: x[1])[0]
    form = client.post("/v1/classify", files={"image": ("red.png", red, "image/png")},
                       data={"labels": ",".join(labels)}).json()
    repeated = client.post("/v1/classify", files=[("image", ("red.png", red, "image/png"))] +
                           [("labels", (None, label)) for label in labels]).json()
    assert form["data"] == repeated["data"] == scores["data"]
    templated = client.post("/v1/classify", json={"image": data_uri(red), "labels": labels,
                                                  "templates": ["a photo of {}."]})
    assert templated.status_code == 200


def test_caption_answer_classify_errors(client, env):
    red = env["red"]
    cases = [
        (client.post("/v1/caption", files={"image": ("x.png", b"not an image at all", "image/png")}), 400, "image",
         "not an image"),
        (client.post("/v1/caption", files={"image": ("x.png", b"", "image/png")}), 400, "image", "empty"),
        (client.post("/v1/caption", data={"prompt": "hello"}), 400, "image", "missing"),
        (client.post("/v1/caption", json={"prompt": "hello"}), 400, "image", "missing"),
        (client.post("/v1/caption", content=b"hello", headers={"content-type": "text/plain"}), 415, None,
         "unsupported content type"),
        (client.post("/v1/caption", content=b"{oops", headers={"content-type": "application/json"}), 400, None,
         "not valid JSON"),
        (client.post("/v1/caption", json={"image": data_uri(red), "max_tokens": 99}), 400, "max_tokens", "at most"),
        (client.post("/v1/answer", json={"image": data_uri(red)}), 400, "question", "missing"),
        (client.post("/v1/answer", json={"image": data_uri(red), "question": " "}), 400, "question", "empty"),
        (client.post("/v1/answer", json={"image": data_uri(red), "question": "q", "model": "nope"}), 404, "model",
         "not served"),
        (client.post("/v1/classify", json={"image": data_uri(red), "labels": []}), 400, "labels", "at least 1"),
        (client.post("/v1/classify", json={"image": data_uri(red), "labels": ["a", ""]}), 400, "labels.1", "empty"),
        (client.post("/v1/classify", json={"image": data_uri(red), "labels": ["a"] * 65}), 400, "labels", "at most"),
        (client.post("/v1/classify", json={"image": data_uri(red), "labels": ["a", "b"], "templates": ["no slot"]}),
         400, None, "'{}'"),
        (client.post("/v1/classify", files={"image": ("x.png", red, "image/png"), "labels": ("l.txt", b"a,b")}),
         400, "labels", "must be text"),
    ]
    for response, status, param, words in cases:
        error = error_of(response, status)
        assert error["param"] == param and words in error["message"], error


def test_unknown_routes_and_methods_are_openai_errors(client):
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


# --- safety ---------------------------------------------------------------------------------------------


def test_non_loopback_needs_an_api_key(env, monkeypatch):
    monkeypatch.delenv("MULTIMODAL_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        with pytest.raises(MultimodalError, match="API key"):
            Settings(host=host).check()
    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        Settings(host=host).check()
    Settings(host="0.0.0.0", api_key="k").check()
    monkeypatch.setenv("MULTIMODAL_API_KEY", "from-env")
    Settings(host="0.0.0.0").check()
    monkeypatch.delenv("MULTIMODAL_API_KEY")
    from multimodal_models.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--model", str(env["vlm"]), "--embedder", "none"]) == 2


def test_api_key_host_and_origin_checks(env):
    client = make_client(env, api_key="s3cret")
    body = {"input": "a red circle"}
    assert error_of(client.post("/v1/embeddings", json=body), 401)["code"] == "invalid_api_key"
    wrong = client.post("/v1/embeddings", json=body, headers={"authorization": "Bearer nope"})
    assert "incorrect API key" in error_of(wrong, 401)["message"]
    assert client.post("/v1/embeddings", json=body, headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    assert client.get("/openapi.json").json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    open_client = make_client(env)
    rebound = open_client.get("/health", headers={"host": "evil.example:8000"})
    assert error_of(rebound, 400)["code"] == "invalid_host"
    assert open_client.get("/health", headers={"host": "127.0.0.1:8000"}).status_code == 200
    assert open_client.get("/health", headers={"host": "[::1]:8000"}).status_code == 200
    cross = open_client.post("/v1/embeddings", json=body, headers={"origin": "http://evil.example"})
    assert error_of(cross, 403)["code"] == "cross_origin"
    same = open_client.post("/v1/embeddings", json=body, headers={"origin": "http://localhost"})
    assert same.status_code == 200


def test_body_size_limit(env):
    client = make_client(env, max_body_bytes=2000)
    big = {"input": "a " * 1500}
    assert error_of(client.post("/v1/embeddings", json=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 500
        yield b'{"input": "a"}'

    assert error_of(client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}),
                    413)["code"] == "request_too_large"
    upload = client.post("/v1/caption", files={"image": ("x.png", b"\0" * 3000, "image/png")})
    assert error_of(upload, 413)["code"] == "request_too_large"


def test_too_many_concurrent_requests_get_429(env):
    gate = threading.Event()
    entered = threading.Event()

    def hold(text):  # the output hook runs in the worker: it keeps the first request in progress
        entered.set()
        gate.wait(10)
        return text

    client = make_client(env, max_concurrent=1, output_filter=hold)
    body = {"messages": image_messages(data_uri(env["red"]), "describe the image."), "max_tokens": 3}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/chat/completions", json=body)
        assert entered.wait(10)
        busy = client.post("/v1/embeddings", json={"input": "red"})
        error = error_of(busy, 429)
        assert busy.headers["retry-after"] == "1" and error["code"] == "server_busy"
        assert client.get("/health").json()["busy"] == 1  # GETs are not limited
        gate.set()
        assert first.result(10).status_code == 200
    assert client.post("/v1/embeddings", json={"input": "red"}).status_code == 200


def test_timeout_gives_504_or_ends_the_stream_cleanly(env):
    slow = make_client(env, request_timeout_s=0.3, output_filter=lambda text: (time.sleep(0.15), text)[1])
    body = {"messages": image_messages(data_uri(env["red"]), "describe the image."), "max_tokens": 20}
    error = error_of(slow.post("/v1/chat/completions", json=body), 504)
    assert error["code"] == "timeout" and "0.3 seconds" in error["message"]
    assert error_of(slow.post("/v1/caption", json={"image": data_uri(env["red"]), "max_tokens": 20}), 504)
    streamed = slow.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 200
    events = read_sse(streamed.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-2] if e.get("choices"))


# --- the output filter -------------------------------------------------------------------------------


def test_output_filter_streams_without_leaking_a_blocked_phrase():
    words = OutputFilter(("red star", "blue"), "replace", "***")
    stream = FilteredStream(words)
    pieces = ["a re", "d st", "ar and a bl", "ue", "ish circle. blue", " sky"]
    out = [stream.push(p) for p in pieces] + [stream.push("", final=True)]
    assert "".join(out) == "a *** and a blueish circle. *** sky"
    assert not any("red" in o or "blue " in o or o.endswith("bl") for o in out)
    refuse = FilteredStream(OutputFilter(("star",), "refuse"))
    sent = [refuse.push(p) for p in ["a red ", "st", "ar is", " here"]]
    assert "".join(sent) == "a red " and refuse.refused
    assert OutputFilter(("Star",), "replace", "#").apply("STAR stars star.") == "# stars #."
    hooked = OutputFilter((), hook=lambda t: t.upper())
    assert hooked.apply("abc") == "ABC"


def test_blocklist_replaces_or_refuses_generated_words(env):
    body = {"messages": image_messages(data_uri(env["red"]), "describe the image."), "max_tokens": 12}
    plain = make_client(env).post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    word = max(plain.replace(".", " ").replace("?", " ").split(), key=len)
    replaced = make_client(env, blocklist=(word,), blocklist_replacement="[x]")
    text = replaced.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert word not in text.split() and "[x]" in text
    events = read_sse(replaced.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert streamed_text(events) == text
    refused = make_client(env, blocklist=(word,), blocklist_action="refuse")
    out = refused.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert out["finish_reason"] == "content_filter" and out["message"]["content"] is None
    assert "withheld" in out["message"]["refusal"]
    events = read_sse(refused.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert word not in streamed_text(events)
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert any(e["choices"][0]["delta"].get("refusal") for e in events[:-1] if e.get("choices"))
    caption = refused.post("/v1/caption", json={"image": data_uri(env["red"]), "max_tokens": 12}).json()
    if word in make_client(env).post("/v1/caption", json={"image": data_uri(env["red"]), "max_tokens": 12}).text:
        assert caption["text"] is None and caption["finish_reason"] == "content_filter"


# --- a real server: the openai client, 32 concurrent clients -------------------------------------------


@contextlib.contextmanager
def running(app):
    import uvicorn

    from multimodal_models.serve.runner import bind_socket

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_openai_client_against_a_real_server(env):
    openai = pytest.importorskip("openai")
    app = create_app(make_settings(env, api_key="test-key"))
    uri = data_uri(env["red"])
    messages = image_messages(uri, "what color is the circle?")
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0, timeout=30)
        assert {m.id for m in client.models.list()} == {"tiny-vlm", "tiny-clip"}
        plain = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=8)
        assert plain.choices[0].message.content and plain.usage.completion_tokens <= 8
        pieces, finish = [], None
        stream = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=8, stream=True)
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == plain.choices[0].message.content and finish == plain.choices[0].finish_reason
        embedded = client.embeddings.create(model="tiny-clip", input=["a red circle", uri])  # base64 on the wire
        direct = client.embeddings.create(model="tiny-clip", input=["a red circle", uri], encoding_format="float")
        assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 16
        np.testing.assert_allclose(embedded.data[1].embedding, direct.data[1].embedding, atol=1e-6)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="tiny-vlm", messages=messages, n=2)
        assert bad.value.status_code == 400 and "n=1" in bad.value.message and bad.value.param == "n"
        with pytest.raises(openai.BadRequestError, match="not an image"):
            client.chat.completions.create(model="tiny-vlm", messages=image_messages(data_uri(b"junk"), "hi"))
        with pytest.raises(openai.NotFoundError, match="not served"):
            client.chat.completions.create(model="gpt-4o", messages=messages)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_32_concurrent_clients_get_their_own_answers(env):
    import httpx

    app = create_app(make_settings(env, max_concurrent=64, workers=2))
    colours = list(COLOURS)
    images = {c: data_uri(encode(shapes_image(c, "circle" if i % 2 else "square"))) for i, c in enumerate(colours)}
    requests = [{"messages": image_messages(images[colours[i % 4]], QUESTIONS[i // 4]), "max_tokens": 6 + i % 5}
                for i in range(32)]

    def ask(client, index: int, stream: bool) -> tuple[int, str, set]:
        if not stream:
            r = client.post("/v1/chat/completions", json=requests[index])
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text, set()
        with client.stream("POST", "/v1/chat/completions", json={**requests[index], "stream": True}) as r:
            text = "".join(r.iter_text())
        events = read_sse(text) if r.status_code == 200 else []
        return r.status_code, streamed_text(events), {e["id"] for e in events if isinstance(e, dict)}

    with running(app) as url, httpx.Client(base_url=url, timeout=60) as single:
        expected = [ask(single, i, False)[1] for i in range(32)]
        assert len(set(expected)) > 8  # the requests really differ

        def one_client(i):
            with httpx.Client(base_url=url, timeout=60) as client:
                return ask(client, i, stream=i % 2 == 0)

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one_client, range(32)))
    assert [status for status, _, _ in results] == [200] * 32
    assert [text for _, text, _ in results] == expected
    ids = [next(iter(ids)) for _, _, ids in results if ids]
    assert all(len(ids_) == 1 for _, _, ids_ in results[::2]) and len(set(ids)) == 16  # one id per stream


def test_connections_have_nagle_off():
    """Accepted connections must be IPPROTO_TCP sockets, or asyncio leaves Nagle's algorithm on and a
    stream's tokens reach a kept-alive client in ~40 ms bursts (delayed ACKs)."""
    import socket

    from multimodal_models.serve.runner import bind_socket

    listener = bind_socket("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()):
        connection, _ = listener.accept()
        with connection:
            assert connection.proto == socket.IPPROTO_TCP


def test_streamed_tokens_arrive_as_they_are_made(env):
    """On a kept-alive connection the pieces of a slow stream arrive spread out, not in one burst."""
    import httpx

    app = create_app(make_settings(env, output_filter=lambda text: (time.sleep(0.03), text)[1]))
    body = {"messages": image_messages(data_uri(env["red"]), "describe the image."), "max_tokens": 8, "stream": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(2):  # the second request reuses the connection
            arrivals = []
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for _line in response.iter_lines():
                    arrivals.append(time.perf_counter())
    assert arrivals[-1] - arrivals[0] > 0.1  # 8 pieces, 30 ms apart


def test_the_serve_command_prints_the_address_and_serves(env):
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "multimodal_models.cli", "serve", "--model", str(env["vlm"]), "--embedder",
         str(env["clip"]), "--index", str(env["index"]), "--port", "0", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        assert line.startswith("multimodal serve: http://127.0.0.1:"), (line, process.stderr.read()
                                                                       if process.poll() is not None else "")
        url = line.split()[2].rstrip("/")
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["models"] == {"vlm": "tiny-vlm", "embedder": "tiny-clip"} and health["index"]["images"] == 6
    finally:
        process.terminate()
        process.wait(10)


# --- fuzzing from the OpenAPI schema -------------------------------------------------------------------
# schemathesis generates valid and invalid requests from /openapi.json; hypothesis drives them
# here directly (schemathesis' own pytest plugin does not work with pytest 9 yet).

OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/search"),
              ("POST", "/v1/caption"), ("POST", "/v1/answer"), ("POST", "/v1/classify"), ("GET", "/v1/models"),
              ("GET", "/health")]


@pytest.fixture(scope="module")
def fuzz_schema(env):
    schemathesis = pytest.importorskip("schemathesis")
    app = create_app(make_settings(env, max_tokens_limit=4, default_max_tokens=4, max_k=5, max_embedding_inputs=4,
                                   max_labels=4, allowed_hosts=("*",), request_timeout_s=10))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_fuzzed_requests_never_get_a_server_error(fuzz_schema, method, path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

    operation = fuzz_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    seen = []

    @given(case=cases)
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        started = time.monotonic()
        response = case.call_and_validate(checks=[not_a_server_error, content_type_conformance,
                                                  response_schema_conformance])
        assert time.monotonic() - started < 10, "a request hung"
        seen.append(response.status_code)

    check()
    assert seen and all(status < 500 for status in seen)
