"""The server's continuous batching over real HTTP: concurrent generations share decoding steps and
answer exactly as each request alone (the model's own `chat`), greedy and with seeded sampling, for
the tiny VLM, the shipped shapes-vlm (image readers) and a tiny LLaVA checkpoint; requests beyond
the batch wait in the queue and only a full queue gives 429; a client that goes away leaves the
batch and frees its place; a model type that cannot batch is decoded one sequence at a time.

The models and images are test_serve.py's (tiny random models saved to a folder)."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from multimodal_models.loading import load
from multimodal_models.models.vlm import VisionLanguageModel

from .test_serve import (COLOURS, QUESTIONS, data_uri, encode, env, error_of, image_messages,  # noqa: F401
                         make_settings, read_sse, running, shapes_image, streamed_text, tiny_vlm)
from .test_serve_interfaces import metric

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from multimodal_models.serve import Settings, create_app  # noqa: E402

torch.set_num_threads(1)


def requests_for(count: int, *, sampled_every: int = 2) -> list[dict]:
    """Different images, questions and budgets; every `sampled_every`-th one sampled with its own seed."""
    colours = list(COLOURS)
    out = []
    for i in range(count):
        image = data_uri(encode(shapes_image(colours[i % 4], "circle" if i % 3 else "square")))
        body = {"messages": image_messages(image, QUESTIONS[i % len(QUESTIONS)]), "max_tokens": 5 + i % 7}
        if i % sampled_every == 1:
            body.update(temperature=0.9, top_p=0.95, seed=100 + i)
        out.append(body)
    return out


def alone(model: VisionLanguageModel, body: dict) -> str:
    """The model's own answer to one request, decoded alone (no server, no batch)."""
    messages = []
    for message in body["messages"]:
        content = []
        for part in message["content"]:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                content.append({"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")})
            else:
                content.append(part)
        messages.append({"role": message["role"], "content": content})
    options = {"max_new_tokens": body["max_tokens"]}
    if "temperature" in body:
        options.update(do_sample=True, temperature=body["temperature"], top_p=body["top_p"], seed=body["seed"])
    return model.chat(messages, **options)


def ask(url: str, body: dict, stream: bool) -> tuple[int, str]:
    with httpx.Client(base_url=url, timeout=60) as client:
        if not stream:
            r = client.post("/v1/chat/completions", json=body)
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            text = "".join(r.iter_text())
        return r.status_code, streamed_text(read_sse(text)) if r.status_code == 200 else text


def hold_until_joined(batcher, count: int, seconds: float = 20) -> None:
    """Let the engine's first step wait until `count` sequences have joined, so that they decode together."""
    original = batcher._step
    give_up = time.monotonic() + seconds

    def step(joining):
        if len(joining) < count and time.monotonic() < give_up:
            with batcher._wake:
                batcher._joining = joining + batcher._joining
            time.sleep(0.005)
            return
        batcher._step = original
        original(joining)

    batcher._step = step


def gate_steps(model) -> threading.Semaphore:
    """Each decoding step of `model` waits for a permit."""
    gate = threading.Semaphore(0)
    original = model.decode_step

    def gated(tokens, cache):
        assert gate.acquire(timeout=30), "the test never let this step run"
        return original(tokens, cache)

    model.decode_step = gated
    return gate


def wait_for(condition, seconds: float = 20) -> None:
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "timed out waiting"
        time.sleep(0.01)


def served_together(app, bodies: list[dict]) -> tuple[list[tuple[int, str]], str]:
    """All requests at once (every other one streamed), decoded together from the first step; the answers
    and the metrics text afterwards."""
    hold_until_joined(app.state.engine.batcher, len(bodies))
    with running(app) as url:
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda i: ask(url, bodies[i], stream=i % 2 == 0), range(len(bodies))))
        metrics = httpx.get(f"{url}/metrics").text
    return results, metrics


def assert_shared_steps(metrics: str, size: int) -> None:
    steps = metric(metrics, "multimodal_decode_batch_size_count")
    below = {le: metric(metrics, "multimodal_decode_batch_size_bucket", le=le) for le in ("1.0", "4.0", "8.0")}
    assert steps > 0 and below["1.0"] < steps, (steps, below)  # some steps decoded several sequences
    if size > 4:
        assert below["4.0"] < below["8.0"], below  # the first step decoded all of them


def test_concurrent_generations_share_steps_and_answer_as_each_alone(env):
    app = create_app(make_settings(env, max_batch_size=8))
    model = app.state.engine.vlm.model
    bodies = requests_for(8)
    expected = [alone(model, body) for body in bodies]
    assert len(set(expected)) > 4 and all(expected)
    results, metrics = served_together(app, bodies)
    assert results == [(200, text) for text in expected]
    assert_shared_steps(metrics, 8)
    assert metric(metrics, "multimodal_batch_size") == 0 and metric(metrics, "multimodal_generation_queue_depth") == 0


def test_shapes_vlm_with_image_readers_answers_in_a_batch_as_alone(env):
    model = load("shapes-vlm")
    assert model.config.image_reader_blocks and model.can_decode_in_batches()
    app = create_app(Settings(model="shapes-vlm", embedder=None, max_tokens_limit=24), vlm=model)
    bodies = requests_for(6)
    bodies[2]["messages"][0]["content"].insert(0, bodies[3]["messages"][0]["content"][0])  # two images
    bodies[4]["messages"][0]["content"] = [{"type": "text", "text": "describe the image."}]  # none
    expected = [alone(model, body) for body in bodies]
    results, metrics = served_together(app, bodies)
    assert results == [(200, text) for text in expected]
    assert_shared_steps(metrics, 6)


def test_a_llava_checkpoint_answers_in_a_batch_as_alone(tmp_path):
    pytest.importorskip("transformers")
    from .test_pretrained_vlm import make_llava

    folder, _ = make_llava(tmp_path / "llava", "qwen2-siglip")
    model = load(folder)
    app = create_app(Settings(model=str(folder), embedder=None, max_tokens_limit=24), vlm=model)
    bodies = requests_for(6)
    expected = [alone(model, body) for body in bodies]
    results, metrics = served_together(app, bodies)
    assert results == [(200, text) for text in expected]
    assert_shared_steps(metrics, 6)


def test_requests_beyond_the_batch_wait_in_the_queue_and_429_only_when_it_is_full(env):
    app = create_app(make_settings(env, max_batch_size=1, max_queue=1))
    engine = app.state.engine
    gate = gate_steps(engine.vlm.model)
    first, second = requests_for(2, sampled_every=99)
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        running_one = pool.submit(ask, url, first, True)
        wait_for(lambda: engine.batcher.size == 1)
        queued = pool.submit(ask, url, second, False)
        wait_for(lambda: engine.batcher.admission.waiting == 1)
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, "multimodal_batch_size") == 1 and metric(metrics, "multimodal_generation_queue_depth") == 1
        health = httpx.get(f"{url}/health").json()["generation"]
        assert health == {"decoding": "batched", "running": 1, "waiting": 1, "max_batch_size": 1, "max_queue": 1}
        busy = httpx.post(f"{url}/v1/chat/completions", json=second, timeout=30)
        error = error_of(busy, 429)
        assert error["code"] == "server_busy" and busy.headers["retry-after"] == "1"
        assert "1 waiting" in error["message"]
        for _ in range(100):
            gate.release()
        assert running_one.result(30) == (200, alone(engine.vlm.model, first))
        assert queued.result(30) == (200, alone(engine.vlm.model, second))
        metrics = httpx.get(f"{url}/metrics").text
    assert metric(metrics, "multimodal_generation_queue_depth") == 0 and metric(metrics, "multimodal_batch_size") == 0
    assert metric(metrics, "multimodal_errors_total", status="429", code="server_busy") == 1


def test_a_client_that_goes_away_leaves_the_batch_and_frees_its_place(env):
    app = create_app(make_settings(env, max_batch_size=1, max_queue=1, max_tokens_limit=40, request_timeout_s=20))
    engine = app.state.engine
    gate = gate_steps(engine.vlm.model)
    body = {"messages": image_messages(data_uri(env["red"]), "describe the image."), "max_tokens": 40}
    later = {**body, "max_tokens": 3}
    hang_up, left = threading.Event(), threading.Event()

    def leave_after_the_first_piece(url):
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                for line in response.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        assert hang_up.wait(20)
                        break  # after the first piece of the answer
        left.set()

    with running(app) as url, ThreadPoolExecutor(2) as pool:
        pool.submit(leave_after_the_first_piece, url)
        wait_for(lambda: engine.batcher.size == 1)
        sequence = engine.batcher.rows[0]
        waiting = pool.submit(ask, url, later, False)
        wait_for(lambda: engine.batcher.admission.waiting == 1)
        hang_up.set()
        assert left.wait(20)
        permits = 0
        while not waiting.done() and permits < 30:  # one decoding step at a time
            gate.release()
            permits += 1
            time.sleep(0.1)
        status, text = waiting.result(30)
        assert status == 200 and text == alone(engine.vlm.model, later)
        # the one that left decoded a step or two more, not its 40 tokens, before the other took its place
        assert sequence.cancelled and sequence.produced < 6 and permits < 10, (sequence.produced, permits)
        wait_for(lambda: engine.batcher.size == 0 and engine.batcher.admission.in_use == 0)


def test_a_model_type_that_cannot_batch_is_decoded_one_sequence_at_a_time(env, caplog):
    class HookedVLM(VisionLanguageModel):  # a block hook whose state the batch knows nothing of
        def block_hook(self, ids, features, cache, packed, slots=None):
            return None

    model = tiny_vlm()
    model.__class__ = HookedVLM
    with caplog.at_level(logging.WARNING, logger="multimodal_models.serve"):
        app = create_app(make_settings(env, embedder=None, index=None, max_batch_size=4), vlm=model)
    assert "one sequence at a time" in caplog.text and "HookedVLM" in caplog.text
    bodies = requests_for(4)
    expected = [alone(model, body) for body in bodies]
    results, metrics = served_together(app, bodies)
    assert results == [(200, text) for text in expected]
    steps = metric(metrics, "multimodal_decode_batch_size_count")
    assert steps > 0 and metric(metrics, "multimodal_decode_batch_size_bucket", le="1.0") == steps
    with running(app) as url:
        assert httpx.get(f"{url}/health").json()["generation"]["decoding"] == "one sequence at a time"


def test_the_batch_and_queue_flags_and_their_checks():
    import argparse

    from multimodal_models.errors import MultimodalError
    from multimodal_models.serve.runner import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--max-batch-size", "4", "--max-queue", "0"]))
    assert (settings.max_batch_size, settings.max_queue) == (4, 0)
    defaults = settings_from_args(parser.parse_args([]))
    assert (defaults.max_batch_size, defaults.max_queue) == (16, 64)
    assert defaults.max_concurrent >= defaults.max_batch_size + defaults.max_queue  # the queue is reachable
    with pytest.raises(MultimodalError, match="max_batch_size must be at least 1"):
        Settings(max_batch_size=0).check()
    with pytest.raises(MultimodalError, match="max_queue must be at least 0"):
        Settings(max_queue=-1).check()
