"""Voice in the product: POST /v1/audio/transcriptions (OpenAI's multipart form, json and text answers,
every field honoured or refused by name, the server's audio limits), chat messages' input_audio parts
(transcribed and put in the message in their place), metrics, the official `openai` client against a
real server, and the CLI's `ask --audio` and voice turns in `chat`; all with a tiny random Whisper
checkpoint made by transformers (2-second window) and a tiny random VLM."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import soundfile
import torch

pytest.importorskip("fastapi")
pytest.importorskip("transformers")

from fastapi.testclient import TestClient

from multimodal_models import load
from multimodal_models.serve import Settings, create_app

from .test_pretrained_whisper import make_whisper
from .test_serve import data_uri, encode, running, shapes_image, tiny_vlm

torch.set_num_threads(1)


def tone_wav(seconds: float, frequency: float = 330.0, rate: int = 22050, seed: int = 0) -> bytes:
    """A WAV file (16-bit PCM, stereo at 22.05 kHz: resampled and mixed down by the server)."""
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * frequency * t) + 0.05 * rng.standard_normal(len(t))
    out = io.BytesIO()
    soundfile.write(out, np.stack([wave, 0.5 * wave], axis=1), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("voice")
    whisper = make_whisper(root / "tiny-whisper", "multilingual")
    vlm = tiny_vlm().save_pretrained(root / "tiny-vlm")
    question = root / "question.wav"
    question.write_bytes(tone_wav(1.2))
    other = root / "other.wav"
    other.write_bytes(tone_wav(0.8, frequency=900.0, seed=3))
    speech = load(whisper)
    return {"root": root, "whisper": whisper, "vlm": vlm, "question": question, "other": other, "speech": speech,
            "text": speech.transcribe(str(question)).strip(), "image": encode(shapes_image("red"))}


def make_settings(env, **overrides) -> Settings:
    values = dict(model=str(env["vlm"]), embedder=None, speech_model=str(env["whisper"]), max_tokens_limit=24,
                  default_max_tokens=8)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def client(env):
    return TestClient(create_app(make_settings(env)), base_url="http://localhost")


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def transcribe(client, audio: bytes, **fields):
    return client.post("/v1/audio/transcriptions", files={"file": ("q.wav", audio, "audio/wav")}, data=fields)


def metric(client, name: str, **labels) -> float:
    text = client.get("/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


# --- /v1/audio/transcriptions --------------------------------------------------------------------


def test_transcriptions_equal_the_models_own(client, env):
    assert env["text"], "the tiny Whisper should say something for the test to mean anything"
    before = metric(client, "multimodal_transcriptions_total", model="tiny-whisper", source="upload")
    before_seconds = metric(client, "multimodal_transcribed_audio_seconds_total", model="tiny-whisper")
    audio = env["question"].read_bytes()
    body = transcribe(client, audio, model="tiny-whisper").json()
    assert body["text"] == env["text"]
    assert body["usage"] == {"type": "duration", "seconds": pytest.approx(1.2, abs=1e-3)}
    plain = transcribe(client, audio, response_format="text")
    assert plain.headers["content-type"].startswith("text/plain") and plain.text == env["text"]
    french = transcribe(client, audio, language="fr", temperature="0").json()
    assert french["language"] == "fr" and french["text"] == env["speech"].transcribe(str(env["question"]),
                                                                                    language="fr").strip()
    other = transcribe(client, env["other"].read_bytes()).json()["text"]
    assert other == env["speech"].transcribe(str(env["other"])).strip()
    assert metric(client, "multimodal_transcriptions_total", model="tiny-whisper", source="upload") == before + 4
    assert metric(client, "multimodal_transcribed_audio_seconds_total", model="tiny-whisper") == pytest.approx(
        before_seconds + 3 * 1.2 + 0.8, abs=1e-3)
    models = {m["id"]: m["kind"] for m in client.get("/v1/models").json()["data"]}
    assert models == {"tiny-vlm": "vlm", "tiny-whisper": "speech_to_text"}
    assert client.get("/health").json()["models"]["speech"] == "tiny-whisper"


@pytest.mark.parametrize("fields,param,words", [
    ({"response_format": "srt"}, "response_format", "'srt' is not supported"),
    ({"response_format": "verbose_json"}, "response_format", "json or text"),
    ({"prompt": "shapes and colours"}, "prompt", "takes no prompt"),
    ({"temperature": "0.4"}, "temperature", "greedily"),
    ({"stream": "true"}, "stream", "whole transcript"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]", "no timestamps"),
    ({"include[]": "logprobs"}, "include[]", "no logprobs"),
    ({"chunking_strategy": "auto"}, "chunking_strategy", "not supported"),
    ({"speed": "2"}, "speed", "unrecognized request argument"),
    ({"language": "xx"}, "language", "unknown language 'xx'"),
])
def test_transcription_fields_are_honoured_or_refused_by_name(client, env, fields, param, words):
    error = error_of(transcribe(client, env["question"].read_bytes(), **fields), 400)
    assert error["param"] == param and words in error["message"], error


def test_transcription_input_errors_and_limits(client, env):
    error = error_of(client.post("/v1/audio/transcriptions", data={"model": "tiny-whisper"}), 400)
    assert error["param"] == "file" and error["code"] == "missing_required_parameter"
    error = error_of(transcribe(client, b"not audio at all" * 10), 400)
    assert error["param"] == "file" and error["code"] == "invalid_audio" and "not a readable audio file" in error["message"]
    error = error_of(transcribe(client, tone_wav(2.5)), 400)  # the tiny Whisper's window is 2 s
    assert error["param"] == "file" and "the limit is 2 s (the speech model's window)" in error["message"]
    error = error_of(client.post("/v1/audio/transcriptions", json={"file": "x"}), 415)
    assert "multipart/form-data" in error["message"]
    error = error_of(transcribe(client, tone_wav(0.5), model="whisper-1"), 404)
    assert error["param"] == "model" and "tiny-whisper" in error["message"]
    error = error_of(transcribe(client, tone_wav(0.5), model="tiny-vlm"), 400)
    assert error["code"] == "model_not_supported" and "speech-to-text" in error["message"]
    short = TestClient(create_app(make_settings(env, max_audio_seconds=1.0)), base_url="http://localhost")
    error = error_of(transcribe(short, tone_wav(1.5)), 400)
    assert "is 1.5 s long; the limit is 1 s (--max-audio-seconds)" in error["message"]
    assert transcribe(short, tone_wav(0.9)).status_code == 200
    small = TestClient(create_app(make_settings(env, max_body_bytes=20_000)), base_url="http://localhost")
    error = error_of(transcribe(small, tone_wav(1.0)), 413)  # 88 kB of WAV
    assert "20,000" in error["message"]


def test_no_speech_model_refuses_audio(env):
    client = TestClient(create_app(make_settings(env, speech_model=None)), base_url="http://localhost")
    error = error_of(transcribe(client, tone_wav(0.5)), 404)
    assert "--speech-model" in error["message"]
    error = error_of(client.post("/v1/chat/completions", json={"messages": audio_messages(env, tone_wav(0.5))}), 400)
    assert error["param"] == "messages.0.content.1" and "speech model" in error["message"]


# --- chat: input_audio parts ----------------------------------------------------------------------


def audio_messages(env, audio: bytes, fmt: str = "wav") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(env["image"])}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt}}]}]


def test_chat_audio_parts_are_transcribed_into_the_message(client, env):
    before = metric(client, "multimodal_transcriptions_total", model="tiny-whisper", source="chat")
    spoken = client.post("/v1/chat/completions", json={"messages": audio_messages(env, env["question"].read_bytes())})
    assert spoken.status_code == 200, spoken.text
    typed = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(env["image"])}},
        {"type": "text", "text": env["text"]}]}]}).json()
    answer = spoken.json()["choices"][0]["message"]["content"]
    assert answer and answer == typed["choices"][0]["message"]["content"]
    assert spoken.json()["usage"] == typed["usage"]  # the same prompt: the transcript in the audio's place
    other = client.post("/v1/chat/completions", json={"messages": audio_messages(env, env["other"].read_bytes())})
    other_typed = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(env["image"])}},
        {"type": "text", "text": env["speech"].transcribe(str(env["other"])).strip()}]}]}).json()
    assert other.json()["usage"] == other_typed["usage"]
    assert metric(client, "multimodal_transcriptions_total", model="tiny-whisper", source="chat") == before + 2


def test_chat_audio_part_errors_name_the_field(client, env):
    def chat(messages):
        return client.post("/v1/chat/completions", json={"messages": messages})

    messages = audio_messages(env, b"")
    messages[0]["content"][1]["input_audio"]["data"] = "%%% not base64"
    error = error_of(chat(messages), 400)
    assert error["param"] == "messages.0.content.1.input_audio.data" and "base64" in error["message"]
    error = error_of(chat(audio_messages(env, tone_wav(0.5), fmt="flac")), 400)
    assert error["param"] == "messages.0.content.1.input_audio.format", error
    error = error_of(chat(audio_messages(env, b"RIFF but not really a wav file")), 400)
    assert error["param"] == "messages.0.content.1.input_audio" and error["code"] == "invalid_audio"
    error = error_of(chat(audio_messages(env, tone_wav(3.0))), 400)
    assert error["param"] == "messages.0.content.1.input_audio" and "the limit is 2 s" in error["message"]
    error = error_of(chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(tone_wav(0.3)).decode(), "format": "wav"}}]}]),
        400)
    assert error["param"] == "messages.1.content.0" and "user messages" in error["message"]
    many = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(tone_wav(0.2)).decode(),
                                                    "format": "wav"}}] * 5
    error = error_of(chat([{"role": "user", "content": many}]), 400)
    assert error["code"] == "too_many_audio_inputs" and "at most 4" in error["message"]


# --- the openai client against a real server ------------------------------------------------------


def test_the_openai_client_transcribes_and_chats_with_audio(env):
    openai = pytest.importorskip("openai")
    app = create_app(make_settings(env, api_key="test-key"))
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0, timeout=30)
        with env["question"].open("rb") as file:
            result = client.audio.transcriptions.create(model="tiny-whisper", file=file)
        assert result.text == env["text"]
        with env["question"].open("rb") as file:
            text = client.audio.transcriptions.create(model="tiny-whisper", file=file, response_format="text")
        assert text.strip() == env["text"]
        with env["question"].open("rb") as file, pytest.raises(openai.BadRequestError) as bad:
            client.audio.transcriptions.create(model="tiny-whisper", file=file, response_format="srt")
        assert bad.value.body["param"] == "response_format"
        reply = client.chat.completions.create(model="tiny-vlm",
                                               messages=audio_messages(env, env["question"].read_bytes()))
        assert reply.choices[0].message.content


# --- the command line: ask --audio, voice turns in chat ---------------------------------------------


def test_ask_with_a_spoken_question_prints_the_transcript_and_the_answer(env, capsys, tmp_path):
    from multimodal_models.cli import main

    image = tmp_path / "red.png"
    image.write_bytes(env["image"])
    args = ["ask", str(image), "--audio", str(env["question"]), "--speech-model", str(env["whisper"]),
            "--model", str(env["vlm"]), "--max-tokens", "6"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = load(env["vlm"]).ask(str(image), env["text"], max_new_tokens=6)
    assert lines == [f"question: {env['text']}", expected]
    assert main(["ask", str(image), "typed?", "--audio", str(env["question"]), "--model", str(env["vlm"])]) == 2
    assert "one of the two" in capsys.readouterr().err
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt nonsense")
    assert main(["ask", str(image), "--audio", str(broken), "--speech-model", str(env["whisper"]),
                 "--model", str(env["vlm"])]) == 2
    assert str(broken) in capsys.readouterr().err


def test_chat_voice_turns_are_transcribed_and_sent(env, capsys, monkeypatch, tmp_path):
    from multimodal_models.cli import main

    image = tmp_path / "red.png"
    image.write_bytes(env["image"])
    turns = f"@{env['question']}\n@{tmp_path / 'missing.wav'}\n@@typed\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    assert main(["chat", str(image), "--speech-model", str(env["whisper"]), "--model", str(env["vlm"]),
                 "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    vlm = load(env["vlm"])
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": env["text"]}]}]
    reply = "".join(vlm.chat(first, images=[str(image)], stream=True, max_new_tokens=6))
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": [
        {"type": "text", "text": "@typed"}]}]
    reply2 = "".join(vlm.chat(second, images=[str(image)], stream=True, max_new_tokens=6))
    assert f"you (voice)> {env['text']}\n" in out
    assert f"model> {reply}\n" in out and out.endswith(f"model> {reply2}\nyou> ")
    assert "missing.wav" in err  # a bad file ends its turn, not the chat


def test_the_api_docs_describe_voice(client):
    schema = client.get("/openapi.json").json()
    form = schema["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = form["schema"]["properties"]
    assert form["schema"]["required"] == ["file"] and fields["response_format"]["enum"] == ["json", "text"]
    assert "refused" in fields["prompt"]["description"] and "refused" in fields["temperature"]["description"]
    assert "puts the transcript in the message in its place" in schema["info"]["description"]
    part = schema["components"]["schemas"]["InputAudioPart"]
    assert "transcribes it" in part["description"]
    assert client.get("/health").json()["max_audio_seconds"] == 2.0  # the tiny Whisper's window


def test_the_voice_flags_and_their_checks(env):
    import argparse

    from multimodal_models.errors import MultimodalError
    from multimodal_models.serve.runner import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--speech-model", str(env["whisper"]), "--max-audio-seconds",
                                                     "12.5", "--max-audio-inputs", "2", "--served-speech-name", "ears"]))
    assert (settings.speech_model, settings.max_audio_seconds, settings.max_audio_inputs,
            settings.served_speech_name) == (str(env["whisper"]), 12.5, 2, ("ears",))
    assert settings_from_args(parser.parse_args([])).speech_model is None  # no voice unless asked for
    with pytest.raises(MultimodalError, match="max_audio_seconds must be > 0"):
        Settings(max_audio_seconds=0).check()
    with pytest.raises(MultimodalError, match="--served-model-name and --served-speech-name share"):
        Settings(served_model_name=("x",), served_speech_name=("x",)).check()
    ears = TestClient(create_app(make_settings(env, model=None, served_speech_name=("ears",))),
                      base_url="http://localhost")  # a server of speech alone
    assert [m["id"] for m in ears.get("/v1/models").json()["data"]] == ["ears"]
    assert transcribe(ears, env["question"].read_bytes(), model="ears").json()["text"] == env["text"]
    error = error_of(ears.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 404)
    assert "--model" in error["message"]
