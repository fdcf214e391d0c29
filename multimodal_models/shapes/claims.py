"""Read a caption back into the claims it makes about a Shapes scene, and check them.

Because the scene graph is known, a caption can be graded claim by claim instead of by
word overlap. The parser understands the grammar the generator writes (and tolerates
anything around it): noun phrases "[det] [size] [colour] noun", relations between two
noun phrases ("A to the left of B"), and extremes ("the leftmost shape is A").

Claims:
- exists:   "a red circle"            at least one red circle
- count:    "two red circles"          exactly two red circles
- only:     "a single red circle"      the scene holds one object, a red circle
- relation: "A to the left of B"       some A is left of some other B
- extreme:  "the leftmost shape is A"  the leftmost object is an A

A mention that names attributes no object has (a blue star when there is none) is a
hallucinated object, as CHAIR counts for COCO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .language import EXTREMES, NUMBER_WORDS, SIZE_SYNONYMS, Description
from .world import COLORS, SHAPES, Scene

_SIZE_WORDS = {w: size for size, words in SIZE_SYNONYMS.items() for w in words} | {"tiny": "small", "huge": "large"}
_NOUNS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
_GENERIC = {"shape", "shapes", "object", "objects", "thing", "things"}
_NUMBERS = {w: k for k, w in enumerate(NUMBER_WORDS)} | {str(k): k for k in range(100)}
_RELATION_PATTERNS = (  # token sequences after an NP, longest first
    (("to", "the", "left", "of"), "left"),
    (("to", "the", "right", "of"), "right"),
    (("left", "of"), "left"),
    (("right", "of"), "right"),
    (("on", "top", "of"), "above"),
    (("above",), "above"),
    (("over",), "above"),
    (("below",), "below"),
    (("under",), "below"),
    (("beneath",), "below"),
)
_GEOMETRY = {  # relation -> holds(a, b) on object centres, no margin (any ordering counts)
    "left": lambda a, b: a.x < b.x,
    "right": lambda a, b: a.x > b.x,
    "above": lambda a, b: a.y < b.y,
    "below": lambda a, b: a.y > b.y,
}


@dataclass(frozen=True)
class Mention:
    description: Description
    count: int | None  # exact count claimed, or None for "at least one"
    start: int  # token span
    end: int
    alone: bool = False  # "a single X": X is the only object in the scene


@dataclass(frozen=True)
class Claim:
    kind: str  # "exists" | "count" | "relation" | "extreme"
    text: str
    holds: bool


@dataclass(frozen=True)
class CaptionCheck:
    claims: tuple[Claim, ...]
    mentions: int  # mentions naming at least one attribute
    hallucinated: tuple[str, ...]  # those that match no object

    @property
    def precision(self) -> float | None:
        return sum(c.holds for c in self.claims) / len(self.claims) if self.claims else None


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def parse_mention(tokens: list[str], i: int) -> Mention | None:
    """A noun phrase starting at token i, or None."""
    start = i
    count: int | None = None
    alone = False
    if i < len(tokens) and tokens[i] in ("a", "an", "the", "one") | _NUMBERS.keys():
        if tokens[i] in _NUMBERS:
            count = _NUMBERS[tokens[i]]
        i += 1
        if tokens[i - 1] in ("a", "an") and i < len(tokens) and tokens[i] in ("single", "lone"):
            count, alone, i = 1, True, i + 1
    size = color = shape = None
    if i < len(tokens) and tokens[i] in _SIZE_WORDS:
        size, i = _SIZE_WORDS[tokens[i]], i + 1
    if i < len(tokens) and tokens[i] in COLORS:
        color, i = tokens[i], i + 1
    if i < len(tokens) and tokens[i] in _NOUNS:
        shape, i = _NOUNS[tokens[i]], i + 1
    elif i < len(tokens) and tokens[i] in _GENERIC:
        i += 1
    else:
        return None
    return Mention(Description(size, color, shape), count, start, i, alone)


def _words(m: Mention) -> str:
    d = m.description
    return " ".join(w for w in (str(m.count) if m.count is not None else "", d.size, d.color, d.shape or "object") if w)


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says, before it is checked against any scene."""

    extremes: tuple[tuple[str, Mention], ...]  # ("leftmost", what it is said to be)
    relations: tuple[tuple[Mention, str, Mention], ...]  # (A, "left"|"right"|"above"|"below", B)
    mentions: tuple[Mention, ...]
    # Only noun phrases, no relation, extreme or "including": an inventory ("two red circles and a
    # blue star", "five shapes"), which the generator writes of every object of the scene
    listing: bool = False


def parse_caption(caption: str) -> ParsedCaption:
    tokens = tokenize(caption)
    extremes, relations, mentions = [], [], []
    i = 0
    previous: Mention | None = None
    while i < len(tokens):
        # "the leftmost shape is a red circle"
        if tokens[i] == "the" and i + 3 < len(tokens) and tokens[i + 1] in EXTREMES and tokens[i + 2] in _GENERIC:
            target = parse_mention(tokens, i + 3 + (tokens[i + 3] in ("is", "was")))
            if target is not None:
                extremes.append((tokens[i + 1], target))
                mentions.append(target)
                previous, i = target, target.end
                continue
        relation = _relation_at(tokens, i) if previous is not None and previous.end == i else None
        if relation is not None:
            phrase, after = relation
            other = parse_mention(tokens, after)
            if other is not None:
                relations.append((previous, phrase, other))
                mentions.append(other)
                previous, i = other, other.end
                continue
        mention = parse_mention(tokens, i)
        if mention is not None:
            mentions.append(mention)
            previous, i = mention, mention.end
            continue
        i += 1
    listing = bool(mentions) and not (extremes or relations) and "including" not in tokens
    return ParsedCaption(tuple(extremes), tuple(relations), tuple(mentions), listing)


def check_parsed(parsed: ParsedCaption, scene: Scene) -> CaptionCheck:
    """Every claim of a parsed caption, each checked against the scene graph."""
    claims: list[Claim] = []
    for word, target in parsed.extremes:
        extreme = min(scene.objects, key=EXTREMES[word]) if scene.objects else None
        claims.append(Claim("extreme", f"{word} is {_words(target)}", extreme is not None and target.description.matches(extreme)))
    for a, phrase, b in parsed.relations:
        holds = any(
            _GEOMETRY[phrase](x, y)
            for x in scene.objects
            if a.description.matches(x)
            for y in scene.objects
            if y is not x and b.description.matches(y)
        )
        claims.append(Claim("relation", f"{_words(a)} {phrase} {_words(b)}", holds))
    for m in parsed.mentions:
        n = m.description.count(scene)
        if m.alone:
            only = len(scene.objects) == 1 and m.description.matches(scene.objects[0])
            claims.append(Claim("only", f"only {_words(m)}", only))
        elif m.count is not None:
            claims.append(Claim("count", _words(m), n == m.count))
        elif not m.description.is_generic:
            claims.append(Claim("exists", _words(m), n > 0))
    attributed = [m for m in parsed.mentions if not m.description.is_generic]
    hallucinated = tuple(_words(m) for m in attributed if m.description.count(scene) == 0)
    return CaptionCheck(tuple(claims), len(attributed), hallucinated)


def check_caption(caption: str, scene: Scene) -> CaptionCheck:
    """Every claim the caption makes, each checked against the scene graph."""
    return check_parsed(parse_caption(caption), scene)


def fits(parsed: ParsedCaption, scene: Scene) -> bool:
    """True when the caption describes the scene correctly: every claim holds and, for an inventory,
    it names every object (exactly as many of each as it says; "a" = one), since the generator lists
    them all. ("A red circle and a blue star" fits no scene of three objects: it was not written of one.)

    The claim checks (check_parsed) read "a red circle" as "at least one", as plain English does;
    this stricter reading is the one the retrieval ceiling needs."""
    check = check_parsed(parsed, scene)
    if not (check.claims and all(c.holds for c in check.claims)):
        return False
    if not parsed.listing or any(m.alone for m in parsed.mentions):
        return True
    said = [1 if m.count is None else m.count for m in parsed.mentions]
    return sum(said) == len(scene.objects) and all(m.description.count(scene) == n for m, n in zip(parsed.mentions, said))


def _relation_at(tokens: list[str], i: int) -> tuple[str, int] | None:
    if i < len(tokens) and tokens[i] in ("is", "are"):
        i += 1
    for pattern, name in _RELATION_PATTERNS:
        if tuple(tokens[i : i + len(pattern)]) == pattern:
            return name, i + len(pattern)
    return None
