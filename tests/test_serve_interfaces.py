"""The server as users of other tools expect it: chat image parts in transformers' forms over
HTTP, every OpenAI request field honoured or refused by name, Prometheus metrics, request ids
in responses and log lines, --served-model-name and --device.

The models and images are test_serve.py's (tiny random models saved to a folder)."""

from __future__ import annotations

import base64
import http.server
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from multimodal_models.errors import MultimodalError

from .test_serve import (REPO, _ImageHandler, data_uri, env, error_of, image_messages, make_client,  # noqa: F401
                         make_settings, read_sse, running)

pytest.importorskip("fastapi")
from multimodal_models.serve import create_app  # noqa: E402
from multimodal_models.serve import schemas as S  # noqa: E402
from multimodal_models.serve.runner import add_arguments, settings_from_args  # noqa: E402

torch.set_num_threads(1)
QUESTION = {"type": "text", "text": "describe the image."}


@pytest.fixture(scope="module")
def client(env):
    return make_client(env)


def chat(client, part: dict, *, role: str = "user", **body):
    return client.post("/v1/chat/completions", json={"messages": [{"role": role, "content": [part, QUESTION]}],
                                                      "max_tokens": 6, **body})


def answer(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def metric(text: str, name: str, **labels) -> float:
    """A sample's value in the Prometheus text format (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --- 2. image parts in every form -------------------------------------------------------------------


def test_image_parts_in_transformers_forms_give_the_answer_of_the_image(client, env):
    photos, red = env["photos"], env["red"]
    expected = answer(chat(client, {"type": "image_url", "image_url": {"url": data_uri(red)}}))
    forms = [
        {"type": "image", "url": data_uri(red)},
        {"type": "image", "base64": base64.b64encode(red).decode()},
        {"type": "image", "base64": data_uri(red)},
        {"type": "image", "image": data_uri(red)},
        {"type": "image", "path": "red.png"},  # relative to an --image-root
        {"type": "image", "path": str(photos / "red.png")},
        {"type": "image", "url": "red.png"},
        {"type": "image", "url": (photos / "red.png").as_uri()},
        {"type": "image_url", "image_url": "red.png"},
    ]
    for part in forms:
        assert answer(chat(client, part)) == expected, part
    assert answer(chat(client, {"type": "image", "path": "blue.png"})) != expected  # the image is really read


@pytest.mark.parametrize("part, status, param, code, words", [
    ({"type": "image", "path": "../secret.png"}, 403, "path", "path_not_allowed", "outside"),
    ({"type": "image", "url": "https://example.com/a.png"}, 400, "url", "remote_images_disabled",
     "--allow-remote-images"),
    ({"type": "image", "image": "https://example.com/a.png"}, 400, "image", "remote_images_disabled",
     "--allow-remote-images"),
    ({"type": "image", "path": "https://example.com/a.png"}, 400, "path", "invalid_image", "no such file"),  # no fetch
    ({"type": "image", "base64": "@@@"}, 400, "base64", "invalid_image", "not valid base64"),
    ({"type": "image", "base64": base64.b64encode(b"junk").decode()}, 400, "base64", "invalid_image", "not an image"),
    ({"type": "image", "url": "ftp://example.com/a.png"}, 400, "url", "invalid_image_url", "unsupported URL scheme"),
    ({"type": "image", "path": "missing.png"}, 400, "path", "invalid_image", "no such file"),
    ({"type": "image", "path": "red.png", "url": "red.png"}, 400, "", "invalid_image_url", "this one has url and path"),
    ({"type": "image"}, 400, "", "invalid_image_url", "one of url, path, base64 or image"),
])
def test_image_parts_obey_the_servers_rules_and_name_the_field(client, part, status, param, code, words):
    error = error_of(chat(client, part), status)
    assert error["param"] == "messages.0.content.0" + (f".{param}" if param else ""), error
    assert error["code"] == code and words in error["message"], error


def test_image_parts_without_image_roots_or_in_other_roles(env):
    no_roots = make_client(env, image_roots=())
    error = error_of(chat(no_roots, {"type": "image", "path": "red.png"}), 403)
    assert error["code"] == "local_images_disabled" and error["param"] == "messages.0.content.0.path"
    error = error_of(chat(no_roots, {"type": "image", "url": data_uri(env["red"])}, role="assistant"), 400)
    assert "user messages" in error["message"] and error["param"] == "messages.0.content.0"


def test_remote_image_parts_when_allowed(env):
    _ImageHandler.files = {"/red.png": env["red"]}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/red.png"
    try:
        client = make_client(env, allow_remote_images=True)
        expected = answer(chat(client, {"type": "image", "base64": base64.b64encode(env["red"]).decode()}))
        assert answer(chat(client, {"type": "image", "url": url})) == expected
        assert error_of(chat(client, {"type": "image", "url": url + ".missing"}), 400)["code"] == "image_fetch_failed"
    finally:
        server.shutdown()


# --- 3. every request field honoured or refused -----------------------------------------------------


def test_every_field_of_openais_request_is_declared():
    """Each field of the installed OpenAI client's chat request is a field here (honoured, accepted
    without effect, or refused by check_chat_options), so none is refused as unrecognized."""
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    assert set(CompletionCreateParamsBase.__annotations__) | {"stream"} <= set(S.ChatCompletionRequest.model_fields)


@pytest.mark.parametrize("field, value, words", [
    ("response_format", {"type": "json_object"}, "does not constrain the output to JSON"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, "json_schema"),
    ("n", 3, "n=1"),
    ("logprobs", True, "not supported"),
    ("top_logprobs", 2, "not supported"),
    ("logit_bias", {"12": 5}, "not supported"),
    ("frequency_penalty", 0.5, "only 0"),
    ("presence_penalty", -1, "only 0"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "no tool"),
    ("tool_choice", "auto", "only 'none'"),
    ("functions", [{"name": "f"}], "no tool"),
    ("function_call", {"name": "f"}, "only 'none'"),
    ("modalities", ["text", "audio"], "text only"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio output"),
    ("prediction", {"type": "content", "content": "x"}, "predicted outputs"),
    ("reasoning_effort", "high", "does not reason"),
    ("verbosity", "low", "verbosity"),
    ("web_search_options", {}, "web search"),
    ("moderation", {"model": "x"}, "moderation"),
    ("store", True, "stores no completions"),
    ("service_tier", "priority", "one tier"),
])
def test_options_the_server_cannot_honour_are_refused_by_name(client, env, field, value, words):
    error = error_of(chat(client, {"type": "image", "url": data_uri(env["red"])}, **{field: value}), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter" and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_options_without_effect_are_accepted_and_change_nothing(client, env):
    part = {"type": "image", "url": data_uri(env["red"])}
    expected = answer(chat(client, part))
    neutral = {"response_format": {"type": "text"}, "n": 1, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
               "frequency_penalty": 0, "presence_penalty": 0, "tools": [], "tool_choice": "none",
               "parallel_tool_calls": True, "modalities": ["text"], "store": False, "service_tier": "auto",
               "metadata": {"team": "vision"}, "user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k",
               "stream_options": None}
    assert answer(chat(client, part, **neutral)) == expected
    # top_k is honoured (an extension, as vLLM's): sampling from the single likeliest token is greedy
    sampled = [answer(chat(client, part, temperature=1.5, seed=seed)) for seed in range(4)]
    assert any(text != expected for text in sampled)
    assert all(answer(chat(client, part, temperature=1.5, seed=seed, top_k=1)) == expected for seed in range(4))


def test_unknown_fields_are_refused_on_every_endpoint(client, env):
    uri = data_uri(env["red"])
    error = error_of(chat(client, {"type": "image", "url": uri}, best_of=2), 400)
    assert error == {"message": "unrecognized request argument supplied: best_of", "type": "invalid_request_error",
                     "param": "best_of", "code": "unknown_parameter"}
    for path, body in (("/v1/embeddings", {"input": "a red circle", "truncate": True}),
                       ("/v1/search", {"query": "a red circle", "top": 3}),
                       ("/v1/caption", {"image": uri, "max_new_tokens": 3}),
                       ("/v1/answer", {"image": uri, "question": "what color?", "beams": 2}),
                       ("/v1/classify", {"image": uri, "labels": ["a", "b"], "temperature": 2})):
        error = error_of(client.post(path, json=body), 400)
        unknown = (set(body) - {"input", "query", "image", "question", "labels"}).pop()
        assert error["param"] == unknown and error["code"] == "unknown_parameter", (path, error)
    upload = client.post("/v1/caption", files={"image": ("red.png", env["red"], "image/png")},
                         data={"max_new_tokens": "3"})
    assert error_of(upload, 400)["param"] == "max_new_tokens"


def test_the_openai_client_gets_refusals_as_bad_requests(env):
    openai = pytest.importorskip("openai")
    with running(create_app(make_settings(env))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        messages = image_messages(data_uri(env["red"]), "describe the image.")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-vlm", messages=messages, response_format={"type": "json_object"})
        assert refused.value.param == "response_format" and refused.value.code == "unsupported_parameter"
        path_part = [{"role": "user", "content": [{"type": "image", "path": "red.png"}, QUESTION]}]
        reply = client.chat.completions.create(model="tiny-vlm", messages=path_part, max_tokens=4)
        assert reply.choices[0].message.content and reply.id == "chatcmpl-" + reply._request_id


# --- 6. operations: metrics, request ids, served names ---------------------------------------------


def test_metrics_count_requests_latency_tokens_and_errors(env):
    client = make_client(env)
    part = {"type": "image", "url": data_uri(env["red"])}
    ok = chat(client, part, max_tokens=5).json()
    error_of(chat(client, part, response_format={"type": "json_object"}), 400)
    error_of(chat(client, part, model="gpt-4o"), 404)
    error_of(client.get("/no/such/page"), 404)
    assert client.post("/v1/embeddings", json={"input": "a red circle"}).status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    chat_route = {"route": "/v1/chat/completions", "method": "POST"}
    assert metric(text, "multimodal_http_requests_total", **chat_route, status="200") == 1
    assert metric(text, "multimodal_http_requests_total", **chat_route, status="400") == 1
    assert metric(text, "multimodal_http_requests_total", **chat_route, status="404") == 1
    assert metric(text, "multimodal_http_requests_total", route="other", method="GET", status="404") == 1
    assert metric(text, "multimodal_http_requests_total", route="/v1/embeddings", method="POST", status="200") == 1
    assert metric(text, "multimodal_http_request_duration_seconds_count", **chat_route) == 3
    assert metric(text, "multimodal_http_request_duration_seconds_sum", **chat_route) > 0
    assert metric(text, "multimodal_http_request_duration_seconds_bucket", **chat_route, le="+Inf") == 3
    assert metric(text, "multimodal_generated_tokens_total", model="tiny-vlm") == ok["usage"]["completion_tokens"] == 5
    assert metric(text, "multimodal_prompt_tokens_total", model="tiny-vlm") == ok["usage"]["prompt_tokens"]
    assert metric(text, "multimodal_errors_total", status="400", code="unsupported_parameter") == 1
    assert metric(text, "multimodal_errors_total", status="404", code="model_not_found") == 1
    assert metric(text, "multimodal_errors_total", status="404", code="not_found") == 1
    for idle in ("multimodal_generations_in_flight", "multimodal_queue_depth", "multimodal_requests_in_progress",
                 "multimodal_batch_size", "multimodal_generation_queue_depth"):
        assert metric(text, idle) == 0, idle
    assert metric(text, "multimodal_server_info", vlm="tiny-vlm", embedder="tiny-clip", device="cpu") == 1
    keyed = make_client(env, api_key="secret")
    assert error_of(keyed.get("/metrics"), 401)["code"] == "invalid_api_key"
    assert keyed.get("/metrics", headers={"authorization": "Bearer secret"}).status_code == 200


def test_metrics_show_generations_in_flight_and_the_queue(env):
    """One worker thread and a slow output filter: while two streams run, one generation waits
    for the worker and both are in flight; when they end, the gauges are back at 0."""
    import httpx

    app = create_app(make_settings(env, workers=1, output_filter=lambda text: (time.sleep(0.05), text)[1]))
    body = {"messages": image_messages(data_uri(env["red"]), "describe the image."), "max_tokens": 20,
            "stream": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as probe:
        seen = {"in_flight": 0.0, "queued": 0.0, "busy": 0.0}

        def stream():
            with httpx.Client(base_url=url, timeout=30) as client:
                return client.post("/v1/chat/completions", json=body).text

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(stream) for _ in range(2)]
            while not all(f.done() for f in futures):
                text = probe.get("/metrics").text
                seen["in_flight"] = max(seen["in_flight"], metric(text, "multimodal_generations_in_flight"))
                seen["queued"] = max(seen["queued"], metric(text, "multimodal_queue_depth"))
                seen["busy"] = max(seen["busy"], metric(text, "multimodal_requests_in_progress"))
                time.sleep(0.01)
            texts = [f.result() for f in futures]
        assert all(read_sse(t)[-1] == "[DONE]" for t in texts)
        assert seen["in_flight"] == 2 and seen["busy"] == 2 and seen["queued"] >= 1, seen
        text = probe.get("/metrics").text
        assert metric(text, "multimodal_generations_in_flight") == 0 and metric(text, "multimodal_queue_depth") == 0
        assert metric(text, "multimodal_generated_tokens_total", model="tiny-vlm") == 40


def test_every_response_has_a_request_id_that_the_ids_and_logs_carry(env, caplog):
    client = make_client(env, api_key="secret")
    key = {"authorization": "Bearer secret"}
    part = {"type": "image", "url": data_uri(env["red"])}
    body = {"messages": [{"role": "user", "content": [part, QUESTION]}], "max_tokens": 4}
    responses = [client.get("/health"), client.get("/metrics", headers=key), client.get("/nowhere"),
                 client.post("/v1/chat/completions", json=body),  # 401: refused before the app
                 client.post("/v1/chat/completions", json={**body, "n": 2}, headers=key),
                 client.post("/v1/chat/completions", json=body, headers=key)]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == len(ids), ids
    assert responses[-1].json()["id"] == f"chatcmpl-{ids[-1]}"
    # the client's id is honoured when sane, replaced when not
    with caplog.at_level(logging.INFO, logger="multimodal_models.serve"):
        mine = client.post("/v1/chat/completions", json=body, headers={**key, "x-request-id": "job-42.a:1"})
    assert mine.headers["x-request-id"] == "job-42.a:1" and mine.json()["id"] == "chatcmpl-job-42.a:1"
    access = [r for r in caplog.records if r.getMessage().startswith("POST /v1/chat/completions 200")]
    assert [r.request_id for r in access] == ["job-42.a:1"]
    for insane in ("two words", "x" * 129, "ünicode".encode(), ""):
        replaced = client.get("/health", headers={"x-request-id": insane}).headers["x-request-id"]
        assert replaced != insane and len(replaced) == 32
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True},
                           headers={**key, "x-request-id": "stream-7"})
    assert {e["id"] for e in read_sse(streamed.text)[:-1]} == {"chatcmpl-stream-7"}
    assert streamed.headers["x-request-id"] == "stream-7"


def test_an_unexpected_error_is_logged_with_the_request_id(env, caplog):
    def broken(_text):
        raise RuntimeError("the filter broke")

    from fastapi.testclient import TestClient

    client = TestClient(create_app(make_settings(env, output_filter=broken)), base_url="http://localhost",
                        raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="multimodal_models.serve"):
        response = client.post("/v1/chat/completions", headers={"x-request-id": "broken-1"},
                               json={"messages": image_messages(data_uri(env["red"]), "describe."), "max_tokens": 3})
    assert response.status_code == 500 and response.headers["x-request-id"] == "broken-1"
    logged = {(r.getMessage().split(" ")[0], r.request_id) for r in caplog.records
              if r.name == "multimodal_models.serve"}
    assert ("unexpected", "broken-1") in logged and ("POST", "broken-1") in logged
    errors = [r for r in caplog.records if r.exc_info]
    assert errors and "the filter broke" in str(errors[0].exc_info[1])
    # a stream that breaks after it started keeps its 200, and is counted as an error
    streamed = client.post("/v1/chat/completions", json={"messages": image_messages(data_uri(env["red"]), "describe."),
                                                          "max_tokens": 3, "stream": True})
    assert streamed.status_code == 200 and read_sse(streamed.text)[0]["choices"][0]["delta"]["role"] == "assistant"
    text = client.get("/metrics").text
    assert metric(text, "multimodal_errors_total", status="500", code="internal_error") == 1
    assert metric(text, "multimodal_errors_total", status="200", code="internal_error") == 1


def test_served_model_names(env):
    client = make_client(env, served_model_name=("vision-chat", "vc"), served_embedder_name=("embed",))
    listed = [(m["id"], m["kind"]) for m in client.get("/v1/models").json()["data"]]
    assert listed == [("vision-chat", "vlm"), ("vc", "vlm"), ("embed", "dual_encoder")]
    assert client.get("/health").json()["models"] == {"vlm": "vision-chat", "embedder": "embed"}
    part = {"type": "image", "url": data_uri(env["red"])}
    for name in ("vision-chat", "vc", None):
        reply = chat(client, part, **({"model": name} if name else {}))
        assert reply.status_code == 200 and reply.json()["model"] == "vision-chat", reply.text
    error = error_of(chat(client, part, model="tiny-vlm"), 404)  # the folder's name is no longer an API name
    assert "'tiny-vlm' is not served here; for chat completions use 'vision-chat'" in error["message"]
    assert error_of(chat(client, part, model="embed"), 400)["code"] == "model_not_supported"
    embedded = client.post("/v1/embeddings", json={"input": "a red circle", "model": "embed"})
    assert embedded.status_code == 200 and embedded.json()["model"] == "embed"
    with pytest.raises(MultimodalError, match="share the name"):
        make_client(env, served_model_name=("x",), served_embedder_name=("x",))
    with pytest.raises(MultimodalError, match="--served-model-name: a model name must be"):
        make_client(env, served_model_name=(" x",))


def test_device_and_dtype(env):
    from multimodal_models.devices import resolve_device

    with pytest.raises(MultimodalError, match=r"--device cuda:99: this machine has no such GPU \(available: .*cpu"):
        make_client(env, device="cuda:99")
    with pytest.raises(MultimodalError, match="--device: expected cpu, cuda, cuda:N, mps or auto"):
        make_client(env, device="tpu")
    auto = make_client(env)  # the default is auto
    assert auto.get("/health").json()["devices"] == {"vlm": str(resolve_device("auto")),
                                                     "embedder": str(resolve_device("auto"))}
    cpu = make_client(env, device="cpu")
    assert cpu.get("/health").json()["devices"] == {"vlm": "cpu", "embedder": "cpu"}
    search = cpu.post("/v1/search", json={"query": "a red circle", "k": 2, "thumbnails": False})
    assert search.status_code == 200 and len(search.json()["data"]) == 2  # the index's queries, embedded there
    half = make_client(env, device="cpu", dtype="bfloat16", index=None)  # (the index was built in float32)
    engine = half.app.state.engine
    assert {p.dtype for p in engine.vlm.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.embedder.model.parameters()} == {torch.bfloat16}
    assert answer(chat(half, {"type": "image", "url": data_uri(env["red"])})).strip()
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--device", "cpu", "--dtype", "bfloat16", "--served-model-name",
                                                     "a", "b", "--served-embedder-name", "c"]))
    assert (settings.device, settings.dtype, settings.served_model_name, settings.served_embedder_name) == (
        "cpu", "bfloat16", ("a", "b"), ("c",))
    assert parser.parse_args([]).device == "auto"


def test_the_serve_command_logs_each_request_with_its_id(env):
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "multimodal_models.cli", "serve", "--model", str(env["vlm"]), "--embedder",
         str(env["clip"]), "--port", "0", "--workers", "1", "--device", "cpu", "--served-model-name", "my-vlm"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        assert line.startswith("multimodal serve: http://127.0.0.1:") and "vlm my-vlm on cpu" in line, line
        url = line.split()[2].rstrip("/")
        reply = httpx.post(f"{url}/v1/chat/completions", headers={"x-request-id": "cli-req-1"}, timeout=30,
                           json={"model": "my-vlm", "messages": image_messages(data_uri(env["red"]), "describe."),
                                 "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["model"] == "my-vlm"
        bad = httpx.post(f"{url}/v1/chat/completions", headers={"x-request-id": "cli-req-2"}, timeout=30,
                         json={"messages": [{"role": "user", "content": "hi"}], "logprobs": True})
        assert bad.status_code == 400
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    lines = stderr.splitlines()
    assert any("[cli-req-1] POST /v1/chat/completions 200" in line for line in lines), stderr
    assert any("[cli-req-2] POST /v1/chat/completions 400" in line for line in lines), stderr
    assert not any("HTTP/1.1" in line for line in lines), stderr  # uvicorn's access log (without ids) is off
