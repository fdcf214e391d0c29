"""The same Shapes question in other words, for measuring whether an answer survives rewording.

Every form of question that questions.py writes is listed here with the wordings the generator uses
(`seen`: a model trained on the Shapes world has met them) and wordings it never uses (`new`). A
question is parsed back into its slots (the objects or groups it names, the attribute, the relation)
by the first form whose wording matches it, and rewritten:

- seen: another training wording of the same form, or the same question with its two objects swapped
  and the relation turned round ("is A left of B?" -> "is B right of A?"; "are there more A than B?"
  -> "are there fewer B than A?"), which keeps the answer;
- new: a wording outside the generator's ("what color is X?" -> "which colour does X have?",
  "X is what color?"). Some use words outside the Shapes vocabulary ("colour", "picture"); the
  evaluation reports how many of them a model's tokenizer does not know.

Every paraphrase keeps the question's answer (yes/no, the attribute value, the count, left/right,
above/below) and its grounding.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .language import SIZE_SYNONYMS, with_article
from .world import COLORS, SHAPES

_SIZES = "|".join(sorted({w for pair in SIZE_SYNONYMS.values() for w in pair} | set(SIZE_SYNONYMS), key=len, reverse=True))
_COLORS = "|".join(sorted(COLORS, key=len, reverse=True))
_NOUNS = "|".join(sorted((*SHAPES, "object", "shape"), key=len, reverse=True))
_DESCRIPTION = rf"(?:(?:{_SIZES}) )?(?:(?:{_COLORS}) )?(?:{_NOUNS})"
SLOTS = {  # slot name -> the words it matches
    "r": rf"the {_DESCRIPTION}", "r1": rf"the {_DESCRIPTION}", "r2": rf"the {_DESCRIPTION}",  # one object
    "a_d": rf"an? {_DESCRIPTION}", "d": _DESCRIPTION,  # "a red circle", "red circle"
    "ds": rf"{_DESCRIPTION}s", "ds1": rf"{_DESCRIPTION}s", "ds2": rf"{_DESCRIPTION}s",  # a group, plural
    "attr": r"color|shape|size",
    "near": r"closest to|nearest to|furthest from|farthest from",
    "rel": r"to the left of|to the right of|above|below",
}
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
SYNONYM = {"closest to": "nearest to", "nearest to": "closest to", "furthest from": "farthest from",
           "farthest from": "furthest from"}


@dataclass(frozen=True)
class Form:
    """One form of question: the wordings the generator uses (the first parses), and new ones. A
    wording is a format string over SLOTS, plus the derived slots `d` (a_d without its article),
    `a_d`, `rel_opposite` and `near_synonym`."""

    question_type: str
    seen: tuple[str, ...]
    new: tuple[str, ...]

    def patterns(self) -> list[re.Pattern]:
        """Parsers of the seen wordings (those without derived slots: a question in one of those is
        also in a wording that has none, since a form's wordings all ask the same)."""
        return [_compile(w) for w in self.seen if not re.search(r"\{(rel_opposite|near_synonym)\}", w)]


def _compile(wording: str) -> re.Pattern:
    parts, used = [], set()
    for piece in re.split(r"(\{[a-z_0-9]+\})", wording):
        if piece.startswith("{") and piece.endswith("}"):
            name = piece[1:-1]
            parts.append(f"(?P={name})" if name in used else f"(?P<{name}>{SLOTS[name]})")
            used.add(name)
        else:
            parts.append(re.escape(piece))
    return re.compile("^" + "".join(parts) + "$")


FORMS: tuple[Form, ...] = (
    Form("exist", ("is there {a_d}?", "is there at least one {d}?", "are there any {ds}?"),
         ("does the picture contain {a_d}?", "can you see {a_d}?", "is {a_d} present in the image?",
          "does the picture contain any {ds}?")),
    Form("count", ("how many {ds} are there?", "how many {ds} are in the image?", "what number of {ds} are visible?"),
         ("count the {ds}.", "what is the number of {ds}?", "how many {ds} can you see?",
          "how many {ds} does the image contain?")),
    Form("query_color", ("what color is {r}?", "what is the color of {r}?", "which color does {r} have?"),
         ("which colour does {r} have?", "{r} is what color?", "what color does {r} have?",
          "tell me the color of {r}.")),
    Form("query_shape", ("what shape is {r}?", "what is the shape of {r}?"),
         ("which shape does {r} have?", "{r} is what shape?", "what kind of shape is {r}?",
          "tell me the shape of {r}.")),
    Form("query_size", ("what size is {r}?", "is {r} small or large?", "how big is {r}?"),
         ("is {r} large or small?", "{r} is what size?", "which size does {r} have?", "tell me the size of {r}.")),
    Form("spatial", ("is {r1} to the left or to the right of {r2}?",),
         ("is {r1} to the right or to the left of {r2}?", "is {r1} left or right of {r2}?",
          "on which side of {r2} is {r1}, left or right?")),
    Form("spatial", ("is {r1} above or below {r2}?",),
         ("is {r1} below or above {r2}?", "is {r1} above {r2} or below it?", "where is {r1} relative to {r2}, above or below?")),
    Form("spatial", ("is {r1} {rel} {r2}?", "is {r2} {rel_opposite} {r1}?"),
         ("is it true that {r1} is {rel} {r2}?", "is {r1} located {rel} {r2}?", "does {r1} lie {rel} {r2}?")),
    Form("closest", ("what {attr} is the object {near} {r}?", "what {attr} is the object {near_synonym} {r}?"),
         ("which {attr} does the object {near} {r} have?", "the object {near} {r} is what {attr}?",
          "what is the {attr} of the object {near} {r}?")),
    Form("same_attribute", ("is {r1} the same color as {r2}?", "is {r2} the same color as {r1}?"),
         ("do {r1} and {r2} have the same color?", "are {r1} and {r2} the same color?",
          "does {r1} have the same color as {r2}?")),
    Form("same_attribute", ("does {r1} have the same shape as {r2}?", "does {r2} have the same shape as {r1}?"),
         ("are {r1} and {r2} the same shape?", "is {r1} the same shape as {r2}?",
          "do {r1} and {r2} have the same shape?")),
    Form("same_attribute", ("are {r1} and {r2} the same size?", "are {r2} and {r1} the same size?"),
         ("is {r1} the same size as {r2}?", "do {r1} and {r2} have the same size?",
          "does {r1} have the same size as {r2}?")),
    Form("same_attribute", ("how many other objects are the same color as {r}?",),
         ("how many other objects have the same color as {r}?", "count the other objects with the same color as {r}.",
          "how many objects besides {r} share its color?")),
    Form("same_attribute", ("how many other objects have the same shape as {r}?",),
         ("how many other objects are the same shape as {r}?", "count the other objects with the same shape as {r}.",
          "how many objects besides {r} share its shape?")),
    Form("same_attribute", ("how many other objects are the same size as {r}?",),
         ("how many other objects have the same size as {r}?", "count the other objects with the same size as {r}.",
          "how many objects besides {r} share its size?")),
    Form("compare_count", ("are there more {ds1} than {ds2}?", "are there fewer {ds2} than {ds1}?"),
         ("is the number of {ds1} greater than the number of {ds2}?", "do {ds1} outnumber {ds2}?",
          "are {ds1} more numerous than {ds2}?")),
    Form("compare_count", ("are there fewer {ds1} than {ds2}?", "are there more {ds2} than {ds1}?"),
         ("is the number of {ds1} smaller than the number of {ds2}?", "do {ds2} outnumber {ds1}?",
          "are {ds1} less numerous than {ds2}?")),
    Form("compare_count", ("are there as many {ds1} as {ds2}?", "are there as many {ds2} as {ds1}?"),
         ("is the number of {ds1} equal to the number of {ds2}?", "are there equally many {ds1} and {ds2}?",
          "do {ds1} and {ds2} come in the same number?")),
    Form("compare_size", ("is {r1} larger than {r2}?", "is {r2} smaller than {r1}?"),
         ("is {r1} bigger than {r2}?", "is {r1} greater in size than {r2}?", "does {r1} have a larger size than {r2}?")),
    Form("compare_size", ("is {r1} smaller than {r2}?", "is {r2} larger than {r1}?"),
         ("is {r1} tinier than {r2}?", "is {r1} smaller in size than {r2}?", "does {r1} have a smaller size than {r2}?")),
)
# the generator writes "closest" and "furthest" questions alike
FORMS = FORMS + tuple(Form("furthest", f.seen, f.new) for f in FORMS if f.question_type == "closest")
_PARSERS = [(form, pattern) for form in FORMS for pattern in form.patterns()]


@dataclass(frozen=True)
class Paraphrases:
    question: str
    seen: tuple[str, ...]  # other generator wordings (and swapped objects) of the same question
    new: tuple[str, ...]  # wordings the generator never uses


def _fill(wording: str, slots: dict[str, str]) -> str:
    return wording.format(**slots)


def paraphrases(question: str, question_type: str | None = None) -> Paraphrases | None:
    """The question's paraphrases, or None where no form parses it (a question of another world)."""
    text = " ".join(question.strip().lower().split())
    for form, pattern in _PARSERS:
        if question_type is not None and form.question_type != question_type:
            continue
        match = pattern.match(text)
        if match is None:
            continue
        slots = dict(match.groupdict())
        if "a_d" in slots:
            slots["d"] = slots["a_d"].split(" ", 1)[1]
        if "rel" in slots:
            slots["rel_opposite"] = OPPOSITE[slots["rel"]]
        if "near" in slots:
            slots["near_synonym"] = SYNONYM[slots["near"]]
        elif "d" in slots:
            slots["a_d"] = with_article(slots["d"])
        if "ds" in slots and "d" not in slots:  # every plural the generator writes adds an s
            slots["d"] = slots["ds"][:-1]
            slots["a_d"] = with_article(slots["d"])
        elif "d" in slots and "ds" not in slots:
            slots["ds"] = slots["d"] + "s"
        seen = tuple(dict.fromkeys(s for s in (_fill(w, slots) for w in form.seen) if s != text))
        new = tuple(_fill(w, slots) for w in form.new)
        return Paraphrases(text, seen, new)
    return None


def pick(options: tuple[str, ...], key: str, seed: int) -> str | None:
    """One of the options, the same for the same key and seed in every run."""
    return random.Random(f"{seed}:{key}").choice(options) if options else None
