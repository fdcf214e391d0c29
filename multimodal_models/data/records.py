"""The small set of record types every reader returns and every task consumes.

Reading COCO, VQA v2, LLaVA conversations, MMMU or the Shapes benchmark gives these same
types, so training and evaluation code never care which file format the data came from.
An image is referenced, not decoded: a path on disk, or the encoded bytes where the
format embeds them (MMMU's parquet files). `multimodal_models.data.images.load_image`
turns either into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# A file on disk, or the bytes of an encoded image (PNG/JPEG/...).
ImageSource = Path | bytes


Points = tuple[tuple[float, float], ...]  # object centres (x, y), fractions of the image side

@dataclass(frozen=True)
class CaptionRecord:
    """One image with its reference captions (COCO has 5 per image)."""

    image_id: int | str
    image: ImageSource
    captions: tuple[str, ...]
    split: str | None = None


@dataclass(frozen=True)
class VQARecord:
    """One question about one image, with its human answers (10 in VQA v2)."""

    question_id: int | str
    image_id: int | str
    image: ImageSource
    question: str
    answers: tuple[str, ...] = ()  # every human answer; empty when the split has no annotations
    answer: str | None = None  # the single target answer (VQA's multiple_choice_answer)
    answer_type: str | None = None  # "yes/no" | "number" | "other" in VQA v2
    question_type: str | None = None
    # Optional grounding (GQA's question annotations in spirit), object centres as fractions of the
    # image side: referents[i], the objects the question's i-th description names; evidence, the
    # objects its answer is read from (empty: it rests on none, "how many ...?" 0; None: not annotated).
    # Training may supervise where the model looks with them.
    referents: tuple[Points, ...] = ()
    evidence: Points | None = None


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; `<image>` in the text marks where an image goes."""

    role: str  # "system" | "user" | "assistant"
    text: str
    # a user turn's grounding, as VQARecord's: the objects its question names and reads its answer from
    referents: tuple[Points, ...] = ()
    evidence: Points | None = None
    question_type: str | None = None  # a user turn's form of question, for accuracy per form


@dataclass(frozen=True)
class ConversationRecord:
    """A multi-turn conversation about zero or more images (LLaVA's layout)."""

    id: str
    images: tuple[ImageSource, ...]
    turns: tuple[Turn, ...]

    def exchanges(self) -> list[tuple[Turn | None, Turn]]:
        """Each assistant turn with the user turn it answers (None where another assistant or
        system turn came between)."""
        out, asked = [], None
        for turn in self.turns:
            if turn.role == "user":
                asked = turn
            elif turn.role == "assistant":
                out.append((asked, turn))
                asked = None
        return out


@dataclass(frozen=True)
class MultipleChoiceRecord:
    """One MMMU-style question: text with `<image k>` markers, options, the gold answer."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: str  # an option letter ("A".."I") for multiple-choice; free text for open questions
    images: tuple[ImageSource, ...] = ()
    subject: str = ""  # MMMU subject, e.g. "Art" (the id's middle part)
    subfield: str = ""
    question_type: str = "multiple-choice"  # or "open"
    extra: dict = field(default_factory=dict, compare=False, hash=False)


ROLES = ("system", "user", "assistant")
