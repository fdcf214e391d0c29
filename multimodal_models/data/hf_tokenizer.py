"""A pretrained checkpoint's tokenizer (tokenizer.json + tokenizer_config.json) behind the same
interface as our WordTokenizer, so models and `models.inputs.tokenize` take either.

tokenizer.json holds the whole pipeline (normaliser, pre-tokeniser, BPE/Unigram/WordPiece model,
post-processor that adds the special tokens, decoder); tokenizer_config.json names the special
tokens, the model_max_length and an optional chat template. As in transformers 5, the special
tokens a text gets are those of tokenizer.json's post-processor: tokenizer_config.json's
add_bos_token / add_eos_token flags are ignored when there is a tokenizer.json. Padding and
truncation stored in tokenizer.json are switched off: `tokenize` pads, and refuses over-long texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import DataFormatError
from ..io import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_NO_LIMIT = 10**20  # transformers writes ~1e30 as model_max_length when there is no limit


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """tokenizers.Tokenizer from a checkpoint's tokenizer.json, with its tokenizer_config.json."""

    def __init__(self, tokenizer_json: str, config: dict | None = None, special_tokens_map: dict | None = None,
                 chat_template: str | None = None):
        self._json = tokenizer_json  # saved back unchanged
        self.config = dict(config or {})
        self.special_tokens_map = dict(special_tokens_map or {})
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.special_tokens = {}  # "bos" / "eos" / "pad" / "unk" -> token text
        for name in ("bos", "eos", "pad", "unk"):
            key = f"{name}_token"
            token = _token_text(self.config.get(key)) or _token_text(self.special_tokens_map.get(key))
            if token is not None:
                self.special_tokens[name] = token
        limit = self.config.get("model_max_length")
        bounded = isinstance(limit, (int, float)) and limit < _NO_LIMIT
        self.model_max_length: int | None = int(limit) if bounded else None
        self.chat_template: str | None = self.config.get("chat_template") or chat_template

    # -- files ---------------------------------------------------------------------------

    @staticmethod
    def saved_in(directory: str | Path) -> bool:
        """Whether `directory` holds a tokenizer in this layout (tokenizer.json next to tokenizer_config.json)."""
        directory = Path(directory)
        return (directory / TOKENIZER_FILE).is_file() and (directory / CONFIG_FILE).is_file()

    @classmethod
    def from_folder(cls, directory: str | Path) -> HFTokenizer:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            hint = ""
            if (directory / "spiece.model").is_file() or (directory / "sentencepiece.bpe.model").is_file():
                hint = (" It has only a SentencePiece model, which this package does not read; save a fast "
                        "tokenizer (tokenizer.json) for it with transformers first.")
            raise FileNotFoundError(f"{path} not found: the checkpoint has no tokenizer.json.{hint}")
        return cls(path.read_text(encoding="utf-8"), read_json_object(directory / CONFIG_FILE),
                   read_json_object(directory / SPECIAL_TOKENS_FILE),
                   _read_text(directory / CHAT_TEMPLATE_FILE))

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """tokenizer.json (or its folder); tokenizer_config.json is read from the same folder."""
        path = Path(path)
        return cls.from_folder(path if path.is_dir() else path.parent)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (to `path`, or into it if it is a folder) and tokenizer_config.json
        (+ special_tokens_map.json) next to it; returns the tokenizer.json written."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / TOKENIZER_FILE
        atomic_write_text(path, self._json)
        config = dict(self.config)
        if self.chat_template and "chat_template" not in config:
            config["chat_template"] = self.chat_template
        atomic_write_text(path.parent / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.special_tokens_map:
            atomic_write_text(path.parent / SPECIAL_TOKENS_FILE,
                              json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n")
        return path

    # -- use (the interface of data.tokenizer.WordTokenizer) -------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        suffix = getattr(self.tokenizer.model, "end_of_word_suffix", None)
        if suffix:  # CLIP's BPE marks word ends with "</w>", which its byte-level decoder leaves in
            text = text.replace(suffix, " ").strip()
        return text

    def token_to_id(self, token: str) -> int:
        index = self.tokenizer.token_to_id(token)
        if index is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return index

    def id_to_token(self, index: int) -> str:
        return self.tokenizer.id_to_token(index)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad")

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk")

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos")


def read_json_object(path: Path) -> dict | None:
    """A checkpoint's optional JSON file (tokenizer_config.json, processor_config.json, ...): its
    object, None when the file is absent, DataFormatError naming the file when it is broken."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None
