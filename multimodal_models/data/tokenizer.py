"""A word-level tokenizer for small closed vocabularies (the Shapes world, or your own data).

Built with the `tokenizers` library and saved as tokenizer.json, the file format that
pretrained checkpoints use, so `tokenizers.Tokenizer.from_file` (and transformers'
`PreTrainedTokenizerFast(tokenizer_file=...)`) read it as they read any other.
Text is NFKC-normalised and lowercased, then split into words and punctuation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

from ..io import atomic_write_text

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<bos>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)  # ids 0..4, in this order
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,?!;:])")


class WordTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with word-level vocabulary."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")

    @classmethod
    def train(cls, texts: Iterable[str], *, min_frequency: int = 1, extra_special_tokens: tuple[str, ...] = ()) -> WordTokenizer:
        tokenizer = Tokenizer(WordLevel(unk_token=UNK))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        specials = list(SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
        trainer = WordLevelTrainer(special_tokens=specials, min_frequency=min_frequency, show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
        )
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (into `path` if it is a folder); returns the file written."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        atomic_write_text(path, self.tokenizer.to_str(pretty=True))
        return path

    # -- use ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text)

    def token_to_id(self, token: str) -> int:
        index = self.tokenizer.token_to_id(token)
        if index is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return index

    def id_to_token(self, index: int) -> str:
        return self.tokenizer.id_to_token(index)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self.token_to_id(PAD)

    @property
    def unk_id(self) -> int:
        return self.token_to_id(UNK)

    @property
    def bos_id(self) -> int:
        return self.token_to_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(EOS)

    @property
    def image_id(self) -> int:
        return self.token_to_id(IMAGE)
