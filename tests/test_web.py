"""The web page end to end: `multimodal serve` over an index of a generated Shapes collection,
driven in headless Chromium by Playwright: search, upload, caption, ask, streamed chat, a bad
file's error, picking a search result. Skips without Chromium (fails in CI: see .ci/run)."""

from __future__ import annotations

import base64
import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_models.cli import main

from .conftest import require_program
from .test_serve import tiny_clip, tiny_vlm

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 20_000


@contextlib.contextmanager
def serve(*args: str):
    """`multimodal serve ... --port 0` in a subprocess; yields its address (from the line it prints)."""
    process = subprocess.Popen([sys.executable, "-m", "multimodal_models.cli", "serve", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        if not line.startswith("multimodal serve: http://"):
            process.kill()
            pytest.fail(f"the server did not start: {line}{process.stderr.read()}")
        yield line.split()[2].rstrip("/")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(tiny_shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    vlm = tiny_vlm().save_pretrained(root / "vlm")
    clip = tiny_clip().save_pretrained(root / "clip")
    images = tiny_shapes / "images" / "test"
    assert main(["index", str(images), "--model", str(clip), "--out", str(root / "index"), "--quiet"]) == 0
    with serve("--model", str(vlm), "--index", str(root / "index"), "--workers", "2") as url:
        yield {"url": url, "images": sorted(images.glob("*.png"))}


@pytest.fixture(scope="module")
def browser():
    executable = require_program("chromium", "headless browser for the web page tests")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    outside: list[str] = []
    page.on("request", lambda request: None if request.url.startswith((server["url"], "data:", "blob:"))
            else outside.append(request.url))
    page.goto(server["url"] + "/")
    page.wait_for_selector("#status:has-text('index of 8 images')")
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not outside, f"the page requested outside resources: {outside}"


def expect():
    from playwright.sync_api import expect as _expect

    return _expect


def test_search_shows_a_thumbnail_grid(page):
    page.fill("#search-query", "a red circle")
    page.press("#search-query", "Enter")
    figures = page.locator("#results figure")
    expect()(figures).to_have_count(8)
    expect()(page.locator("#search-info")).to_contain_text("8 results")
    sources = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.src)")
    assert len(sources) == 8 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert page.eval_on_selector_all("#results img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
    page.check("#search-rerank")  # the served VLM rescores the results
    page.press("#search-query", "Enter")
    expect()(page.locator("#search-info")).to_contain_text("8 results for “a red circle”, reranked by the VLM")
    expect()(figures).to_have_count(8)
    scores = page.eval_on_selector_all("#results .score", "spans => spans.map(s => parseFloat(s.textContent.slice(6)))")
    assert scores == sorted(scores, reverse=True)  # the reranker's scores, best first
    page.uncheck("#search-rerank")
    figures.first.click()  # a result becomes the image to talk about: it is captioned at once
    expect()(page.locator("#preview")).to_be_visible()
    expect()(page.locator("#caption")).to_have_text(re.compile(r"\w"))


def test_upload_caption_ask_and_streamed_chat(page, server):
    import httpx

    image = server["images"][0]
    page.set_input_files("#file-input", str(image))
    expect()(page.locator("#preview")).to_be_visible()
    caption = page.locator("#caption")
    expect()(caption).to_have_text(re.compile(r"\w"))
    expected_caption = httpx.post(f"{server['url']}/v1/caption", files={"image": (image.name, image.read_bytes())},
                                  timeout=30).json()["text"]
    assert caption.inner_text() == expected_caption

    page.fill("#question", "what color is the circle?")
    page.click("#ask-button")
    expect()(page.locator("#answer")).to_have_text(re.compile(r"\w"))
    expected_answer = httpx.post(f"{server['url']}/v1/answer", files={"image": (image.name, image.read_bytes())},
                                 data={"question": "what color is the circle?"}, timeout=30).json()["text"]
    assert page.inner_text("#answer") == expected_answer

    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver((records) => { window.updates += records.length; })
            .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input", "describe the image.")
    page.click("#chat-button")
    reply = page.locator("#chat-log li.assistant[data-done='true']")
    expect()(reply).to_have_count(1)
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    expected = httpx.post(f"{server['url']}/v1/chat/completions", timeout=30, json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                     {"type": "text", "text": "describe the image."}]}]}).json()
    assert reply.inner_text() == expected["choices"][0]["message"]["content"]
    assert page.evaluate("window.updates") > 3  # user bubble, assistant bubble, then the text piece by piece
    assert page.locator("#chat-log li.user").inner_text() == "describe the image."
    # a second turn goes on with the same image
    page.fill("#chat-input", "what color is it?")
    page.click("#chat-button")
    expect()(page.locator("#chat-log li.assistant[data-done='true']")).to_have_count(2)
    expect()(page.locator("#error")).to_be_hidden()


def test_a_bad_file_shows_a_clear_error(page, server):
    page.set_input_files("#file-input", files=[{"name": "broken.png", "mimeType": "image/png",
                                                 "buffer": b"this is not a picture at all"}])
    error = page.locator("#error")
    expect()(error).to_be_visible()
    expect()(error).to_contain_text("broken.png: not an image in a supported format")
    page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    expect()(error).to_contain_text("notes.txt is not an image")
    page.set_input_files("#file-input", files=[{"name": "half.png", "mimeType": "image/png",
                                                 "buffer": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}])
    expect()(error).to_contain_text("half.png: corrupt image header")
    page.set_input_files("#file-input", str(server["images"][1]))  # a good file clears the error
    expect()(page.locator("#caption")).to_have_text(re.compile(r"\w"))
    expect()(error).to_be_hidden()


def test_dropping_an_image_captions_it(page, server):
    image = server["images"][2]
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop-zone").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", base64.b64encode(image.read_bytes()).decode())
    expect()(page.locator("#preview")).to_have_attribute("alt", "dropped.png")
    expect()(page.locator("#caption")).to_have_text(re.compile(r"\w"))
    page.click("#similar-button")  # search by the dropped image: the image itself comes first
    expect()(page.locator("#search-info")).to_contain_text("results for dropped.png")
    assert page.locator("#results figcaption .path").first.inner_text() == image.name
