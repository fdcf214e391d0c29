"""Chat messages -> token ids, for the models trained here.

Messages use the Hugging Face chat format: a list of {"role", "content"}, where content
is a string or a list of typed parts ({"type": "text", "text": ...} and {"type": "image"},
optionally with the image itself under "image"). A "<image>" marker inside a text string
counts as an image part, as in LLaVA's conversation files.

The word-level template writes

    <bos> <user> [<image> x K] question words <assistant> answer words <eos> <user> ...

and marks the assistant's words and the <eos> after them as training targets. Each image
becomes K copies of the <image> token; the model replaces those positions with the
projected image features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.records import ConversationRecord
from ..data.tokenizer import IMAGE, WordTokenizer

ROLE_TOKENS = {"system": "<system>", "user": "<user>", "assistant": "<assistant>"}
CHAT_SPECIAL_TOKENS = tuple(ROLE_TOKENS.values())


@dataclass
class ChatEncoding:
    ids: list[int]
    targets: list[bool]  # True where the token is something the assistant said (trained on)
    images: list[Any] = field(default_factory=list)  # image parts, in order (None where not given inline)


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
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise ValueError(f"messages[{index}].content parts must be {{'type': 'text'|'image', ...}}, got {part!r}")
            if part["type"] == "image":
                parts.append(part)
                continue
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
