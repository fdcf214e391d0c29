"""A pretrained checkpoint's tokenizer (tokenizer.json + tokenizer_config.json) behind the same
interface as our WordTokenizer, so models and `models.inputs.tokenize` take either; and SigLIP's
SentencePiece tokenizer (spiece.model + tokenizer_config.json, `SiglipSentencePieceTokenizer`),
which SigLIP (v1) repositories ship instead of a tokenizer.json. `checkpoint_tokenizer(folder)`
reads whichever a folder holds.

tokenizer.json holds the whole pipeline (normaliser, pre-tokeniser, BPE/Unigram/WordPiece model,
post-processor that adds the special tokens, decoder); tokenizer_config.json names the special
tokens, the model_max_length and an optional chat template. As in transformers 5, the special
tokens a text gets are those of tokenizer.json's post-processor: tokenizer_config.json's
add_bos_token / add_eos_token flags are ignored when there is a tokenizer.json. Padding and
truncation stored in tokenizer.json are switched off: `tokenize` pads, and refuses over-long texts.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable
from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer

from ..errors import DataFormatError
from ..io import atomic_write_bytes, atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPIECE_FILE = "spiece.model"
_NO_LIMIT = 10**20  # transformers writes ~1e30 as model_max_length when there is no limit
SPIECE_UNDERLINE = "▁"  # SentencePiece's word-start mark


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class _SpecialIds:
    """pad_id / unk_id / bos_id / eos_id of a tokenizer whose `special_tokens` maps those names to tokens."""

    special_tokens: dict

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

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


class HFTokenizer(_SpecialIds):
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
            if (directory / SPIECE_FILE).is_file() or (directory / "sentencepiece.bpe.model").is_file():
                hint = (" It has only a SentencePiece model, which this package reads for SigLIP only "
                        "(SiglipTokenizer); save a fast tokenizer (tokenizer.json) for it with transformers first.")
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

    def _special_id(self, name: str) -> int | None:  # a special token missing from the vocabulary: None
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)



class SiglipSentencePieceTokenizer(_SpecialIds):
    """SigLIP's tokenizer as its repositories ship it (spiece.model + tokenizer_config.json), read with
    the sentencepiece library and applied step by step as transformers' SiglipTokenizer applies it:

    - "▁" + the text (its own "▁" made spaces), split around the added and special tokens
      (tokenizer_config.json's added_tokens_decoder, eos / unk / pad; a token marked lstrip / rstrip
      eats the spaces beside it);
    - each other part canonicalised as big_vision does: lowercased (do_lower_case), punctuation
      (string.punctuation) removed, runs of whitespace made one space, stripped; then encoded by
      SentencePiece after the unk token, whose pieces are dropped again;
    - a leading lone "▁" before a special token dropped; ids from the added tokens, else the model;
      with add_special_tokens, </s> appended unless the text ends with it.

    The interface is HFTokenizer's (encode, encode_batch, decode, pad_id, save, ...).
    """

    def __init__(self, model: bytes, config: dict | None = None, special_tokens_map: dict | None = None,
                 *, source: str | Path = SPIECE_FILE):
        self._model = model  # saved back unchanged
        self.config = dict(config or {})
        self.special_tokens_map = dict(special_tokens_map or {})
        kind = self.config.get("tokenizer_class", "SiglipTokenizer")
        if kind != "SiglipTokenizer":
            raise DataFormatError(source, f"a SentencePiece tokenizer of class {kind!r}: this package reads "
                                          "SentencePiece models only as SigLIP's (SiglipTokenizer); save a fast "
                                          "tokenizer (tokenizer.json) for it with transformers", field="tokenizer_class")
        if self.config.get("legacy") is False:
            raise DataFormatError(source, "legacy=false (SentencePiece without its dummy prefix) is not supported",
                                  field="legacy")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=model)
        except (RuntimeError, TypeError) as exc:
            raise DataFormatError(source, f"not a SentencePiece model: {exc}") from None
        self.do_lower_case = bool(self.config.get("do_lower_case", True))
        defaults = {"eos": "</s>", "unk": "<unk>", "pad": "</s>"}  # SiglipTokenizer's
        self.special_tokens = {}
        for name in ("bos", "eos", "pad", "unk"):
            key = f"{name}_token"
            token = _token_text(self.config.get(key)) or _token_text(self.special_tokens_map.get(key))
            token = token if key in self.config or key in self.special_tokens_map else defaults.get(name)
            if token is not None:
                self.special_tokens[name] = token
        extra = [_token_text(t) for key in ("additional_special_tokens", "extra_special_tokens")
                 for t in (self.config.get(key) or self.special_tokens_map.get(key) or [])]
        self.all_special = set(self.special_tokens.values()) | {t for t in extra if t}
        # added tokens: text -> (id, lstrip, rstrip); SiglipTokenizer makes its specials strip both sides
        self.added: dict[str, tuple[int, bool, bool]] = {}
        for index, entry in (self.config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                self.added[entry["content"]] = (int(index), bool(entry.get("lstrip")), bool(entry.get("rstrip")))
        next_id = max([self.processor.get_piece_size() - 1] + [i for i, _, _ in self.added.values()]) + 1
        for token in sorted(self.all_special - set(self.added)):
            index = self.processor.piece_to_id(token)
            if self.processor.id_to_piece(index) != token:  # not in the model: appended, as transformers does
                index, next_id = next_id, next_id + 1
            self.added[token] = (index, True, True)
        self._by_id = {index: token for token, (index, _, _) in self.added.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")")
        self._unk_pieces = len(self.processor.encode(self.special_tokens.get("unk", "<unk>")))
        limit = self.config.get("model_max_length", 64)
        self.model_max_length: int | None = int(limit) if isinstance(limit, (int, float)) and limit < _NO_LIMIT else None
        self.chat_template: str | None = None

    # -- files ---------------------------------------------------------------------------

    @staticmethod
    def saved_in(directory: str | Path) -> bool:
        directory = Path(directory)
        return (directory / SPIECE_FILE).is_file() and (directory / CONFIG_FILE).is_file()

    @classmethod
    def from_folder(cls, directory: str | Path) -> SiglipSentencePieceTokenizer:
        directory = Path(directory)
        path = directory / SPIECE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return cls(path.read_bytes(), read_json_object(directory / CONFIG_FILE),
                   read_json_object(directory / SPECIAL_TOKENS_FILE), source=path)

    def save(self, path: str | Path) -> Path:
        """Write spiece.model and tokenizer_config.json (+ special_tokens_map.json) into `path`, or next
        to it when it names a file (as HFTokenizer.save is called with .../tokenizer.json)."""
        path = Path(path)
        directory = path if path.is_dir() or not path.suffix else path.parent
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / SPIECE_FILE, self._model)
        config = {"tokenizer_class": "SiglipTokenizer", **self.config}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.special_tokens_map:
            atomic_write_text(directory / SPECIAL_TOKENS_FILE,
                              json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n")
        return directory / SPIECE_FILE

    # -- tokenizing, as SiglipTokenizer does ----------------------------------------------------

    def canonicalize(self, text: str) -> str:
        if self.do_lower_case:
            text = text.lower()
        text = text.translate(str.maketrans("", "", string.punctuation))
        return re.sub(r"\s+", " ", text).strip()

    def _pieces(self, text: str) -> list[str]:
        pieces = self.processor.encode(self.special_tokens.get("unk", "<unk>") + self.canonicalize(text), out_type=str)
        return pieces[self._unk_pieces:] if len(pieces) >= self._unk_pieces else pieces

    def tokens(self, text: str) -> list[str]:
        parts = self._split.split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")) if self.added else [
            SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")]
        for i in range(1, len(parts), 2):  # the added tokens, between the text parts
            _, lstrip, rstrip = self.added[parts[i]]
            if rstrip and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
            if lstrip and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if part:
                tokens += [part] if i % 2 or part in self.all_special else self._pieces(part)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special:
            tokens = tokens[1:]
        return tokens

    def token_to_id(self, token: str) -> int:
        if token in self.added:
            return self.added[token][0]
        return self.processor.piece_to_id(token)

    def id_to_token(self, index: int) -> str:
        return self._by_id.get(index) or self.processor.id_to_piece(index)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids = [self.token_to_id(token) for token in self.tokens(text)]
        eos = self.eos_id
        if add_special_tokens and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(text, add_special_tokens=add_special_tokens) for text in texts]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids`: SentencePiece's decoding of the pieces, special tokens written between
        them (or left out), as SiglipTokenizer decodes."""
        special = {self.token_to_id(token): token for token in self.all_special}
        text, pieces, after_special = "", [], False
        for index in ids:
            if index in special:
                if not skip_special_tokens:
                    text += ("" if after_special else " ") + self.processor.decode(pieces) + special[index]
                    pieces, after_special = [], True
            else:
                pieces.append(self.id_to_token(index))
                after_special = False
        return (text + self.processor.decode(pieces)).strip()


    @property
    def vocab_size(self) -> int:
        return max(self.processor.get_piece_size(), max(self._by_id, default=-1) + 1)



def checkpoint_tokenizer(directory: str | Path) -> HFTokenizer | SiglipSentencePieceTokenizer | None:
    """The tokenizer of a checkpoint folder: tokenizer.json (HFTokenizer; preferred, as transformers
    prefers a fast tokenizer), else SigLIP's spiece.model; None when it has neither."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return HFTokenizer.from_folder(directory)
    if (directory / SPIECE_FILE).is_file():
        return SiglipSentencePieceTokenizer.from_folder(directory)
    return None


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
