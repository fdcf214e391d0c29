"""Chat messages -> token ids, for the models trained here.

Messages use the Hugging Face chat format: a list of {"role", "content"}, where content
is a string or a list of typed parts. A "<image>" marker inside a text string counts as an
image part, as in LLaVA's conversation files. An image part is any of the forms people send:

    {"type": "image"}                          the next of the `images` given beside the messages
    {"type": "image", "image": PIL | bytes | path | URL}
    {"type": "image", "path": "photo.jpg"}     read with data.images.load_image
    {"type": "image", "url": "https://..."}    (also data: URIs and file:// URLs)
    {"type": "image", "base64": "iVBOR..."}    (or a data: URI)
    {"type": "image_url", "image_url": {"url": ...}}   OpenAI's form (the url as above)

Images named by an http(s) URL are fetched only inside `with remote_images():`: the library
makes no network request of its own accord (as the server, which needs --allow-remote-images).
`resolve_image_part` turns each form into {"type": "image", "image": ...}.

The word-level template writes

    <bos> <user> [<image> x K] question words <assistant> answer words <eos> <user> ...

and marks the assistant's words and the <eos> after them as training targets. Each image
becomes K copies of the <image> token; the model replaces those positions with the
projected image features.

`JinjaChatTemplate` is the same interface for pretrained checkpoints: their own Jinja chat
template (tokenizer_config.json, chat_template.json or chat_template.jinja) rendered as
transformers renders it, each image placeholder in the text expanded to that model's image
tokens, and the whole string tokenized at once (as transformers' processors do).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..data.images import load_image
from ..data.records import ConversationRecord
from ..data.tokenizer import IMAGE, WordTokenizer

ROLE_TOKENS = {"system": "<system>", "user": "<user>", "assistant": "<assistant>"}
CHAT_SPECIAL_TOKENS = tuple(ROLE_TOKENS.values())


@dataclass
class ChatEncoding:
    ids: list[int]
    targets: list[bool]  # True where the token is something the assistant said (trained on)
    images: list[Any] = field(default_factory=list)  # image parts, in order (None where not given inline)


# -- image parts -------------------------------------------------------------------------------

IMAGE_PART_TYPES = ("image", "image_url")
IMAGE_SOURCE_KEYS = ("image", "path", "url", "base64")  # the keys of {"type": "image", ...} that carry an image
REMOTE_TIMEOUT_S = 10.0
MAX_REMOTE_IMAGE_BYTES = 20 * 1024 * 1024

_URL_FETCHER: ContextVar[Callable[[str], bytes] | None] = ContextVar("remote_image_fetcher", default=None)


def fetch_url(url: str, *, timeout: float = REMOTE_TIMEOUT_S, max_bytes: int = MAX_REMOTE_IMAGE_BYTES) -> bytes:
    """The bytes at an http(s) URL: one GET (redirects followed), at most `max_bytes`, within `timeout` seconds."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "multimodal-models"}),
                                    timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"could not fetch the image at {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ValueError(f"could not fetch the image at {url}: {getattr(exc, 'reason', exc)}") from None
    if len(data) > max_bytes:
        raise ValueError(f"the image at {url} is larger than {max_bytes:,} bytes")
    return data


@contextmanager
def remote_images(fetch: Callable[[str], bytes] | None = None) -> Iterator[None]:
    """Inside this block, image parts naming an http(s) URL are fetched, by `fetch(url) -> bytes`
    (default `fetch_url`: a plain GET, 10 s, at most 20 MB). Outside it they are refused::

        with remote_images():
            model.chat([{"role": "user", "content": [{"type": "image", "url": "https://..."},
                                                     {"type": "text", "text": "What is this?"}]}])
    """
    token = _URL_FETCHER.set(fetch or fetch_url)
    try:
        yield
    finally:
        _URL_FETCHER.reset(token)


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def resolve_image_part(part: dict, *, where: str = "the image part") -> dict:
    """Any form of image part -> {"type": "image", "image": the image, or None when the part names none}.

    A path, file:// URL, data: URI or base64 string is read here with `load_image`; an http(s)
    URL is fetched only inside `remote_images()`. Anything else under "image" (a PIL image,
    bytes, a path) is kept for the image processor to load."""
    if part.get("type") == "image_url":
        given = part.get("image_url")
        url = given.get("url") if isinstance(given, dict) else given
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}, got {given!r}")
        return {"type": "image", "image": _load_reference(url, where=f"{where}.image_url.url", key="url")}
    sources = [key for key in IMAGE_SOURCE_KEYS if part.get(key) is not None]
    if len(sources) > 1:
        raise ValueError(f"{where}: an image part carries one image, this one has {' and '.join(sources)}")
    if not sources:
        return {"type": "image", "image": None}
    key = sources[0]
    value = part[key]
    if key == "image" and not isinstance(value, str):
        return {"type": "image", "image": value}  # PIL, bytes, a Path, a file object: load_image takes them
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}.{key} must be a non-empty string, got {value!r}")
    if key == "path":
        return {"type": "image", "image": load_image(value)}
    if key == "base64":
        return {"type": "image", "image": load_image(_base64_image(value, where=f"{where}.base64"),
                                                    name=f"{where}.base64")}
    if key == "image" and not _scheme(value) in ("http", "https", "data", "file"):
        return {"type": "image", "image": value}  # a path, loaded by the image processor as before
    return {"type": "image", "image": _load_reference(value, where=f"{where}.{key}", key=key)}


def _scheme(reference: str) -> str:
    head, colon, _ = reference.strip().partition(":")
    return head.lower() if colon and len(head) > 1 else ""  # a drive letter (C:) is part of a path


def _load_reference(reference: str, *, where: str, key: str):
    """A URL (http(s), data:, file://) or a path -> a decoded image."""
    from urllib.parse import unquote, urlsplit

    reference = reference.strip()
    scheme = _scheme(reference)
    if scheme == "data":
        return load_image(_base64_image(reference, where=where), name=where)
    if scheme in ("http", "https"):
        fetch = _URL_FETCHER.get()
        if fetch is None:
            raise ValueError(f"{where}: {reference} is a remote image, and images are fetched only inside "
                             "`with multimodal_models.models.chat.remote_images():`; or pass the image itself "
                             "({'type': 'image', 'image': PIL image or bytes})")
        return load_image(fetch(reference), name=f"{where} ({reference})")
    if scheme == "file":
        parts = urlsplit(reference)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{where}: a file URL must name a local file (file:///path), not host {parts.netloc!r}")
        return load_image(unquote(parts.path))
    if scheme:
        raise ValueError(f"{where}: unsupported URL scheme {scheme!r} (use a path, a file://, data: or http(s) URL)")
    return load_image(reference)  # a local path (transformers reads one under "url" too)


def _base64_image(text: str, *, where: str) -> bytes:
    """The bytes of a base64 string or a base64 data: URI."""
    if _scheme(text) == "data":
        header, comma, text = text.partition(",")
        if not comma or "base64" not in header.lower():
            raise ValueError(f"{where}: only base64 data: URIs are read (data:image/png;base64,...)")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not valid base64") from None
    if not data:
        raise ValueError(f"{where}: the image data is empty")
    return data


def _check_text_part(part: Any, index: int) -> None:
    if not isinstance(part, dict) or part.get("type") != "text":
        raise ValueError(f"messages[{index}].content parts must be {{'type': 'text'|'image'|'image_url', ...}}, "
                         f"got {part!r}")



def normalize_messages(messages: list[dict]) -> list[tuple[str, list[dict]]]:
    """[(role, [parts])] with every part {"type": "text", "text"} or {"type": "image", "image"?}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"messages[{index}].role is {role!r}; expected one of {sorted(ROLE_TOKENS)}")
        content = message["content"]
        parts: list[dict] = []
        for number, part in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content):
            if is_image_part(part):
                parts.append(resolve_image_part(part, where=f"messages[{index}].content[{number}]"))
                continue
            _check_text_part(part, index)
            pieces = str(part.get("text", "")).split(IMAGE)
            for k, piece in enumerate(pieces):
                if k:
                    parts.append({"type": "image"})
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip()})
        normalized.append((role, parts))
    return normalized


def conversation_to_messages(record: ConversationRecord) -> list[dict]:
    """A LLaVA-style record as chat messages (its images stay in record.images, in order)."""
    return [{"role": turn.role, "content": turn.text} for turn in record.turns]


class WordChatTemplate:
    """The chat format of the word-level models trained here."""

    def __init__(self, tokenizer: WordTokenizer, image_tokens: int):
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_id = tokenizer.image_id
        self.role_ids = {role: tokenizer.token_to_id(token) for role, token in ROLE_TOKENS.items()}

    def encode(self, messages: list[dict], *, add_generation_prompt: bool = False) -> ChatEncoding:
        encoding = ChatEncoding([self.tokenizer.bos_id], [False])
        for role, parts in normalize_messages(messages):
            self._add(encoding, [self.role_ids[role]], False)
            for part in parts:
                if part["type"] == "image":
                    self._add(encoding, [self.image_id] * self.image_tokens, False)
                    encoding.images.append(part.get("image"))
                else:
                    self._add(encoding, self.tokenizer.encode(part["text"]), role == "assistant")
            if role == "assistant":
                self._add(encoding, [self.tokenizer.eos_id], True)
        if add_generation_prompt:
            self._add(encoding, [self.role_ids["assistant"]], False)
        return encoding

    @staticmethod
    def _add(encoding: ChatEncoding, ids: list[int], target: bool) -> None:
        encoding.ids.extend(ids)
        encoding.targets.extend([target] * len(ids))

    def stop_ids(self) -> set[int]:
        """Tokens that end an assistant turn."""
        return {self.tokenizer.eos_id, self.role_ids["user"]}


def attach_images(messages: list[dict], images: list[Any] | None) -> list[dict]:
    """The messages with every image part as {"type": "image", "image": ...}: a part that names its
    image (image, path, url, base64, image_url) has it read (`resolve_image_part`), a part without
    one takes the next of `images` in order ("<image>" markers in string contents become image
    parts first).

    Raises when there are more bare image parts than images, or images left over.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    pending = list(images or [])
    attached = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, str):
            if IMAGE not in content:
                attached.append(dict(message))
                continue
            content = _split_image_markers(content)
        parts = []
        for number, part in enumerate(content):
            if is_image_part(part):
                part = resolve_image_part(part, where=f"messages[{index}].content[{number}]")
                if part["image"] is None:
                    if not pending:
                        raise ValueError(f"the messages have more image parts than images were given: "
                                         f"messages[{index}].content[{number}] names no image (image, path, url, "
                                         f"base64) and the {len(images or [])} given beside the messages are used up")
                    part = {**part, "image": pending.pop(0)}
            parts.append(part)
        attached.append({**message, "content": parts})
    if pending:
        raise ValueError(f"{len(pending)} images were given but the messages have no place for them")
    return attached


def _split_image_markers(text: str) -> list[dict]:
    """"<image>\nwhat is it?" -> [{"type": "image"}, {"type": "text", "text": "what is it?"}] (pieces stripped)."""
    parts: list[dict] = []
    for k, piece in enumerate(text.split(IMAGE)):
        if k:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


# -- a checkpoint's own (Jinja) chat template ---------------------------------------------------

_GENERATION_SPANS: ContextVar[list | None] = ContextVar("generation_spans", default=None)


def _compile_template(source: str):
    """Compile a chat template in the environment transformers renders them in: sandboxed,
    trim_blocks + lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson`
    that does not escape HTML, and `{% generation %}` blocks marking what the assistant says."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_mark", [nodes.ContextReference()])
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, context, caller):
            text = caller()
            spans = _GENERATION_SPANS.get()
            if spans is not None:  # where the text lands is found after rendering, by a sentinel
                spans.append(text)
                return f"\x00{len(spans) - 1}\x00{text}\x00"
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlocks, "jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def _template_value(value: Any) -> Any:
    """What a template may see: JSON-like data; any other object (an image) becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _template_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_template_value(v) for v in value]
    return f"<{type(value).__name__}>"


class JinjaChatTemplate:
    """A pretrained checkpoint's chat format: its Jinja template, rendered as transformers does.

    tokenizer: an HFTokenizer (data.hf_tokenizer); template: the Jinja source;
    image_token: the placeholder the template writes for an image ("<image>");
    image_text(image) -> the text that replaces one placeholder (e.g. K copies of "<image>",
    or Idefics3's tile layout), given that image (None when it was not given inline);
    stop_ids: the token ids that end an assistant turn (with the tokenizer's eos).

    The rendered text gets the tokenizer's special tokens (a Llama <s>) unless it already
    starts with the bos token, which is the rule of transformers' processors. Training targets
    are the tokens inside `{% generation %}` blocks when the template has them, else the text
    each assistant message adds to the render of the conversation before it.
    """

    def __init__(self, tokenizer, template: str, *, image_token: str = IMAGE,
                 image_text: Callable[[Any], str] | None = None, stop_ids: Iterable[int] = ()):
        if not isinstance(template, str) or not template.strip():
            raise ValueError("the checkpoint has no chat template (tokenizer_config.json 'chat_template', "
                             "chat_template.json or chat_template.jinja)")
        self.tokenizer = tokenizer
        self.source = template
        self.template = _compile_template(template)
        self.image_token = image_token
        self.image_text = image_text or (lambda image: image_token)
        self.extra_stop_ids = {int(i) for i in stop_ids}
        self.has_generation_blocks = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        special = getattr(tokenizer, "special_tokens", {}) or {}
        self.special_tokens = {f"{name}_token": token for name, token in special.items()}

    # -- rendering ---------------------------------------------------------------------------

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, **kwargs) -> str:
        """The prompt text, placeholders not yet expanded (transformers' apply_chat_template(tokenize=False))."""
        chat, _ = self._template_messages(messages)
        return self.template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens, **kwargs})

    def _template_messages(self, messages: list[dict]) -> tuple[list[dict], list[Any]]:
        """(messages as the template sees them, the images of the image parts in order)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        chat, images = [], []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
            content = message["content"]
            if isinstance(content, str):  # multimodal templates read a list of typed parts
                content = _split_image_markers(content) if IMAGE in content else [{"type": "text", "text": content}]
            parts = []
            for number, part in enumerate(content):
                if is_image_part(part):
                    part = resolve_image_part(part, where=f"messages[{index}].content[{number}]")
                    images.append(part["image"])
                else:
                    _check_text_part(part, index)
                parts.append({k: v for k, v in part.items() if v is not None})
            message = {k: v for k, v in message.items() if v is not None and k != "content"}
            chat.append(_template_value({**message, "content": parts}))
        return chat, images

    # -- the interface of WordChatTemplate -----------------------------------------------------

    def encode(self, messages: list[dict], *, add_generation_prompt: bool = False) -> ChatEncoding:
        chat, images = self._template_messages(messages)
        spans: list[tuple[int, int]] = []
        if self.has_generation_blocks:
            text, spans = self._render_marked(chat, add_generation_prompt)
        else:
            text = self.template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
            spans = self._assistant_spans(chat, text, strict=not add_generation_prompt)
        text, spans = self._expand_images(text, images, spans)
        bos = self.special_tokens.get("bos_token")
        encoded = self.tokenizer.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
        targets = [any(start < span_end and end > span_start for span_start, span_end in spans) and end > start
                   for start, end in encoded.offsets]
        return ChatEncoding(list(encoded.ids), targets, images)

    def stop_ids(self) -> set[int]:
        """Tokens that end an assistant turn: the tokenizer's eos and the checkpoint's own."""
        eos = self.tokenizer.eos_id
        return self.extra_stop_ids | ({eos} if eos is not None else set())

    # -- helpers -----------------------------------------------------------------------------

    def _render_marked(self, chat: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """Render with the `{% generation %}` blocks located: (text, [(start, end)] of each block)."""
        token = _GENERATION_SPANS.set([])
        try:
            marked = self.template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                          **self.special_tokens)
        finally:
            _GENERATION_SPANS.reset(token)
        pieces, spans, position = [], [], 0
        for k, piece in enumerate(marked.split("\x00")):
            # pieces alternate: text, block number, block text, text, ...
            if k % 3 == 0:
                pieces.append(piece)
                position += len(piece)
            elif k % 3 == 2:
                spans.append((position, position + len(piece)))
                pieces.append(piece)
                position += len(piece)
        return "".join(pieces), spans

    def _assistant_spans(self, chat: list[dict], text: str, *, strict: bool) -> list[tuple[int, int]]:
        """Where each assistant message's text is: what it adds to the render of the conversation
        before it (with the generation prompt). strict: raise when the template is not
        prefix-stable there (its training targets cannot be told apart); else leave it unmarked."""
        spans = []
        for i, message in enumerate(chat):
            if message.get("role") != "assistant":
                continue
            before = self.template.render(messages=chat[:i], add_generation_prompt=True, **self.special_tokens)
            through = self.template.render(messages=chat[: i + 1], add_generation_prompt=False, **self.special_tokens)
            if through.startswith(before) and text.startswith(through):
                spans.append((len(before), len(through)))
            elif strict:
                raise ValueError(f"cannot tell which tokens assistant message {i} says with this chat template (it "
                                 "re-renders earlier turns); add {% generation %} blocks to the template")
        return spans

    def _expand_images(self, text: str, images: list[Any], spans: list[tuple[int, int]]
                       ) -> tuple[str, list[tuple[int, int]]]:
        """Replace the k-th image placeholder by image_text(images[k]); move the spans with the text."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the rendered prompt has {len(pieces) - 1} {self.image_token} placeholders for "
                             f"{len(images)} images (an image token typed in a text part counts too)")
        out, shifts, position = [pieces[0]], [], len(pieces[0])
        for image, piece in zip(images, pieces[1:]):
            expansion = self.image_text(image)
            shifts.append((position, len(expansion) - len(self.image_token)))
            out += [expansion, piece]
            position += len(self.image_token) + len(piece)

        def moved(offset: int) -> int:
            return offset + sum(delta for at, delta in shifts if at < offset)

        return "".join(out), [(moved(a), moved(b)) for a, b in spans]
