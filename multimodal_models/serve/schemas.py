"""Request and response bodies (pydantic), which are also the OpenAPI schema at /openapi.json.

The OpenAI-compatible ones follow OpenAI's field names and shapes. Every field of OpenAI's
request is either honoured or refused with a 400 naming it (app.py `check_chat_options`):
a field that changes nothing about the answer (user, metadata, prompt_cache_key, ...) is
accepted, one asking for what this server cannot do (n > 1, tools, logprobs, JSON output)
is refused, and a field OpenAI does not have is refused as unrecognized.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..index.defaults import DEFAULT_SIMILARITY_WEIGHT as WEIGHT

# --- errors ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- chat completions -----------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... URI; a file:// URL or path inside an --image-root; "
                                 "an http(s) URL with --allow-remote-images")
    detail: str | None = Field(None, description="accepted and ignored")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class ImageRefPart(BaseModel):
    """transformers' form of an image part; exactly one of the fields names the image."""
    type: Literal["image"]
    url: str | None = Field(None, description="as image_url.url: a data: URI, an http(s) URL (with "
                                              "--allow-remote-images), a file:// URL or path inside an --image-root")
    path: str | None = Field(None, description="a file inside one of the server's --image-root folders")
    base64: str | None = Field(None, description="the encoded image file in base64 (or a base64 data: URI)")
    image: str | None = Field(None, description="as url (over HTTP an image can only be a reference)")


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="the encoded audio file in base64")
    format: Literal["wav", "mp3"] = Field(description="the file's format, as OpenAI's chat API has it")


class InputAudioPart(BaseModel):
    """OpenAI's audio input part. The server transcribes it with its speech model (--speech-model) and
    puts the transcript in the message in its place, as a text part; without a speech model it is refused."""
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | ImageRefPart | InputAudioPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description="accepted; no obfuscation padding is added")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


REFUSED = "refused (400) unless "


class ChatCompletionRequest(BaseModel):
    """OpenAI's request, every field of it: honoured, accepted without effect, or refused."""
    model_config = ConfigDict(extra="allow")  # other fields are refused by name (check_chat_options)

    model: str | None = Field(None, description="the served VLM's name (GET /v1/models); default: that one")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens (OpenAI's newer name)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 (the server's default) is greedy decoding")
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension (as vLLM's): sample from the k likeliest tokens "
                                                      "(0: all)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first one")
    n: int | None = Field(None, ge=1, description=REFUSED + "1: one choice per request")
    seed: int | None = Field(None, description="makes sampling (temperature > 0) reproducible")
    response_format: ResponseFormat | None = Field(None, description=REFUSED + "{'type': 'text'}: no constrained "
                                                                               "JSON output")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description=REFUSED + "0")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description=REFUSED + "0")
    logit_bias: dict[str, float] | None = Field(None, description=REFUSED + "empty")
    logprobs: bool | None = Field(None, description=REFUSED + "false")
    top_logprobs: int | None = Field(None, ge=0, le=20, description=REFUSED + "0 (needs logprobs)")
    modalities: list[str] | None = Field(None, description=REFUSED + "['text']")
    tools: list[dict[str, Any]] | None = Field(None, description=REFUSED + "empty: no tool calling")
    tool_choice: Any = Field(None, description=REFUSED + "'none'")
    parallel_tool_calls: bool | None = Field(None, description="accepted; without tools it has no effect")
    functions: list[dict[str, Any]] | None = Field(None, description=REFUSED + "empty (deprecated tools)")
    function_call: Any = Field(None, description=REFUSED + "'none'")
    audio: dict[str, Any] | None = Field(None, description=REFUSED + "null: text output only")
    prediction: dict[str, Any] | None = Field(None, description=REFUSED + "null")
    reasoning_effort: str | None = Field(None, description=REFUSED + "null: the model does not reason first")
    verbosity: str | None = Field(None, description=REFUSED + "null")
    web_search_options: dict[str, Any] | None = Field(None, description=REFUSED + "null")
    moderation: Any = Field(None, description=REFUSED + "null (the server has its own --blocklist)")
    store: bool | None = Field(None, description=REFUSED + "false: the server stores nothing")
    service_tier: str | None = Field(None, description=REFUSED + "'auto' or 'default': there is one tier")
    metadata: dict[str, str] | None = Field(None, description="accepted; kept nowhere (nothing is stored)")
    user: str | None = Field(None, description="accepted; no effect on the answer")
    safety_identifier: str | None = Field(None, description="accepted; no effect on the answer")
    prompt_cache_key: str | None = Field(None, description="accepted; no effect on the answer")
    prompt_cache_retention: str | None = Field(None, description="accepted; no effect on the answer")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="accepted; no effect on the answer")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "content_filter"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


# --- embeddings -----------------------------------------------------------------------------


class EmbeddingImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


EmbeddingItem = Annotated[TextPart | EmbeddingImagePart, Field(discriminator="type")]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str | EmbeddingItem | int | list[int]] = Field(
        description="a text, or a list of inputs. Extension: an image is a string holding a data:image/... URI, "
                    "or {'type': 'image_url', 'image_url': {'url': ...}}; texts may also be {'type': 'text', "
                    "'text': ...}. Images and texts embed into the same space. Token-id arrays are not supported.")
    model: str | None = Field(None, description="the served embedder's id; default: that one")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="must equal the model's dimension if given")
    user: str | None = Field(None, description="accepted; no effect")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# --- search, caption, answer, classify ------------------------------------------------------

IMAGE_FIELD = "an image: data:image/...;base64,... URI, a path or file:// URL inside an --image-root, or an " \
              "http(s) URL with --allow-remote-images"


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, description="text query")
    image: str | None = Field(None, description=IMAGE_FIELD + " (with a text query too: both embeddings are added)")
    k: int = Field(10, ge=1, description="number of results")
    thumbnails: bool = True
    thumbnail_size: int = Field(128, ge=16, le=512, description="longest side of the thumbnails in pixels")
    model: str | None = None
    rerank: bool = Field(False, description="text queries: rescore the best 10 (or k) images by how likely the served "
                                            f"VLM finds the query as their caption, plus {WEIGHT:g} x the cosine (slower; "
                                            "better for relations and lists of objects)")


class SearchHit(BaseModel):
    rank: int
    path: str = Field(description="relative to the indexed folder")
    score: float = Field(description="cosine similarity; with rerank, the reranker's score (the VLM's "
                                     f"log-likelihood of the query + {WEIGHT:g} x the cosine)")
    caption: str | None = None
    thumbnail: str | None = Field(None, description="PNG data: URI without metadata")


class SearchResponse(BaseModel):
    object: Literal["list"]
    data: list[SearchHit]
    model: str
    total: int = Field(description="images in the index")


class CaptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description=IMAGE_FIELD)
    prompt: str | None = Field(None, description="instruction (default: the model's captioning prompt)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    model: str | None = None


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description=IMAGE_FIELD)
    question: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    model: str | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description=IMAGE_FIELD)
    labels: list[str] = Field(min_length=1, description="label names, e.g. ['a red circle', 'a blue star']")
    templates: list[str] | None = Field(None, description="prompt templates with '{}' for the label "
                                                          "(default: the model's own set)")
    model: str | None = None


class GenerationResult(BaseModel):
    object: Literal["caption", "answer"]
    model: str
    text: str | None = Field(description="the caption / answer (null when the output filter refused it)")
    finish_reason: Literal["stop", "length", "content_filter"]
    refusal: str | None = None
    usage: Usage


class LabelScore(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    object: Literal["classification"]
    model: str
    data: list[LabelScore] = Field(description="in the order of the request's labels")
    best: str


# --- audio transcriptions ------------------------------------------------------------------

TRANSCRIPTION_FORMATS = ("json", "text")


class TranscriptionUsage(BaseModel):
    type: Literal["duration"]
    seconds: float = Field(description="the audio's duration")


class Transcription(BaseModel):
    text: str
    model: str = Field(description="the speech model that transcribed it")
    language: str | None = Field(None, description="the language given, or the one the model detected")
    usage: TranscriptionUsage


def transcription_form_schema() -> dict:
    """The multipart/form-data body of POST /v1/audio/transcriptions (OpenAI's fields)."""
    refused = "refused (400) unless "
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "the audio file: WAV, FLAC, MP3 or OGG, any rate and channels, up to the "
                                    "server's --max-audio-seconds"},
            "model": {"type": "string", "description": "the served speech model's name (GET /v1/models); default: "
                                                       "that one"},
            "language": {"type": "string", "description": "the spoken language's code (e.g. en); default: detected"},
            "response_format": {"type": "string", "enum": list(TRANSCRIPTION_FORMATS),
                                "description": "json (default): {text, language, usage}; text: the text alone. "
                                               "srt, vtt, verbose_json and diarized_json are refused (400)"},
            "prompt": {"type": "string", "description": refused + "empty: the model takes no prompt text"},
            "temperature": {"type": "number", "description": refused + "0: decoding is greedy"},
            "stream": {"type": "boolean", "description": refused + "false"},
            "timestamp_granularities[]": {"type": "array", "items": {"type": "string"},
                                          "description": "refused (400): no timestamps"},
            "include[]": {"type": "array", "items": {"type": "string"}, "description": "refused (400): no logprobs"},
            "chunking_strategy": {"type": "string", "description": "refused (400): one window of audio"},
        }}}}}}


# --- models and health ----------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: str = Field(description="'vlm' (chat, caption, answer), 'dual_encoder' (embeddings, search, classify) or "
                                  "'speech_to_text' (audio transcriptions, chat audio parts)")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    models: dict[str, str | None]
    index: dict[str, Any] | None
    busy: int
    max_concurrent: int
    generation: dict[str, Any] | None = Field(
        None, description="the generation engine: 'batched' (continuous batching) or 'one sequence at a time' "
                          "decoding, generations running and waiting, and the limits (--max-batch-size, --max-queue)")
    auth: bool
    devices: dict[str, str | None] = Field(description="where each served model runs (cpu, cuda:0, mps)")
    max_audio_seconds: float | None = Field(None, description="with a speech model: the longest audio transcribed "
                                                              "(--max-audio-seconds, at most the model's window)")


def upload_form_schema(fields: dict[str, dict]) -> dict:
    """The multipart/form-data schema of an endpoint that takes an uploaded image file."""
    return {"type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary", "description": "the image file"}, **fields}}


def json_and_upload_body(model: type[BaseModel], form_fields: dict[str, dict]) -> dict:
    """openapi_extra for an endpoint reading JSON (with a data: URI) or a multipart upload."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": upload_form_schema(form_fields)},
    }}}
