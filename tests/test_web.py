"""The web page end to end: `multimodal serve` over an index of a generated Shapes collection,
driven in headless Chromium by Playwright: search, upload, caption, ask, streamed chat, a bad
file's error, picking a search result; and the microphone (a fake capture device fed from a file,
a tiny random Whisper). Skips without Chromium (fails in CI: see .ci/run)."""

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
def chromium():
    """(Playwright's chromium launcher, the executable): one Playwright per module, whatever browsers it starts."""
    executable = require_program("chromium", "headless browser for the web page tests")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        yield p.chromium, executable


@pytest.fixture(scope="module")
def browser(chromium):
    launcher, executable = chromium
    browser = launcher.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
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

    expect()(page.locator("#mic-button")).to_be_hidden()  # this server has no speech model
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


# --- the microphone: a fake capture device fed from a WAV file --------------------------------------


def spoken_wav(path: Path, seconds: float = 2.0, rate: int = 16000) -> Path:
    """A steady broadband sound: the harmonics of 100 Hz up to 7.9 kHz with fixed random phases. It repeats
    every 10 ms, so the loop the fake capture device plays has no seam and wherever the recording starts its
    spectrum is the same; every mel band holds energy, so the recording's codec noise hardly changes the
    log-mel features (a pure tone's near-empty bands would be all noise)."""
    import numpy as np
    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    phases = np.random.default_rng(0).uniform(0, 2 * np.pi, 79)
    wave = sum(np.sin(2 * np.pi * 100 * k * t + phases[k - 1]) for k in range(1, 80))
    soundfile.write(path, 0.3 * wave / np.abs(wave).max(), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def voice(tmp_path_factory, chromium):
    """A server with a tiny random Whisper (2-second window) and a browser whose microphone plays a sound
    file, with the Whisper's transcript of that file computed in advance."""
    pytest.importorskip("transformers")
    launcher, executable = chromium
    import numpy as np

    from multimodal_models import load

    from .test_pretrained_whisper import make_whisper

    root = tmp_path_factory.mktemp("voice-web")
    whisper = make_whisper(root / "whisper", "multilingual")
    vlm = tiny_vlm().save_pretrained(root / "vlm")
    sound = spoken_wav(root / "question.wav")
    speech = load(whisper)
    expected = speech.transcribe(str(sound)).strip()
    # the transcript tells this sound from silence and from a tone: the page's text comes from what it recorded
    rate = speech.config.sampling_rate
    silence, tone = np.zeros(2 * rate, np.float32), 0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)
    assert expected not in (speech.transcribe(silence, source_rate=rate).strip(),
                            speech.transcribe(tone, source_rate=rate).strip())
    args = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={sound}"]
    with serve("--model", str(vlm), "--embedder", "none", "--speech-model", str(whisper)) as url:
        browser = launcher.launch(executable_path=executable, args=args, headless=True)
        try:
            yield {"url": url, "browser": browser, "text": expected}
        finally:
            browser.close()


def test_the_microphone_records_transcribes_and_asks(voice, tiny_shapes):
    import httpx

    context = voice["browser"].new_context(permissions=["microphone"])
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(voice["url"] + "/")
    page.wait_for_selector("#status:has-text('speech whisper')")
    image = sorted((tiny_shapes / "images" / "test").glob("*.png"))[0]
    page.set_input_files("#file-input", str(image))
    mic = page.locator("#mic-button")
    expect()(mic).to_be_enabled()
    mic.click()  # records until the server's limit (the tiny Whisper's 2 s window) and stops by itself
    expect()(mic).to_have_attribute("aria-pressed", "true")
    expect()(mic).to_have_attribute("aria-pressed", "false", timeout=10_000)
    expect()(page.locator("#answer")).not_to_have_text(re.compile(r"^(…)?$"), timeout=30_000)
    heard = page.input_value("#question")
    assert heard == voice["text"]
    expect()(page.locator("#mic-status")).to_have_text(f"heard: “{voice['text']}”")
    expected_answer = httpx.post(f"{voice['url']}/v1/answer", files={"image": (image.name, image.read_bytes())},
                                 data={"question": heard}, timeout=30).json()["text"]
    assert page.inner_text("#answer") == expected_answer
    metrics = httpx.get(f"{voice['url']}/metrics", timeout=30).text  # one upload, cut at the 2-second limit
    assert 'multimodal_transcriptions_total{model="whisper",source="upload"} 1.0' in metrics
    assert 'multimodal_transcribed_audio_seconds_total{model="whisper"} 2.0' in metrics
    expect()(page.locator("#error")).to_be_hidden()
    assert not errors
    context.close()
