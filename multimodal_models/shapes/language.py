"""Words for the Shapes world: descriptions of objects and the captions built from them.

A `Description` is a partial set of attributes (size, colour, shape); it matches every
object that has them. Captions are assembled from descriptions so that every claim they
make (an object exists, a group has exactly k members, A is left of B, the leftmost
object is X) is true of the scene by construction; `grounding.py` parses the same
grammar back into claims and checks them.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .world import COLORS, SHAPES, SIZES, Scene, ShapeObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SIZE_SYNONYMS = {"small": ("small", "little"), "large": ("large", "big")}
GENERIC_NOUNS = ("shape", "object")
BACKGROUND_PHRASES = ("on a dark background", "on a grey background", "")

# Two objects are "left of" each other in words only when their centres are this far
# apart horizontally (fraction of the width); the same margin applies vertically. It keeps
# every spatial statement unambiguous to a human looking at a 64 px image.
SPATIAL_MARGIN = 0.10
# "closest"/"furthest"/"leftmost" are only used when the winner beats the runner-up by this much.
EXTREME_MARGIN = 0.08

RELATIONS = {  # phrase -> test on (a, b)
    "to the left of": lambda a, b: b.x - a.x >= SPATIAL_MARGIN,
    "to the right of": lambda a, b: a.x - b.x >= SPATIAL_MARGIN,
    "above": lambda a, b: b.y - a.y >= SPATIAL_MARGIN,
    "below": lambda a, b: a.y - b.y >= SPATIAL_MARGIN,
}
EXTREMES = {  # word -> key whose smallest value wins
    "leftmost": lambda o: o.x,
    "rightmost": lambda o: -o.x,
    "topmost": lambda o: o.y,
    "bottommost": lambda o: -o.y,
}


@dataclass(frozen=True)
class Description:
    size: str | None = None
    color: str | None = None
    shape: str | None = None

    def matches(self, obj: ShapeObject) -> bool:
        return (
            (self.size is None or obj.size == self.size)
            and (self.color is None or obj.color == self.color)
            and (self.shape is None or obj.shape == self.shape)
        )

    def count(self, scene: Scene) -> int:
        return sum(self.matches(o) for o in scene.objects)

    @property
    def is_generic(self) -> bool:
        return self.size is None and self.color is None and self.shape is None

    def words(self, *, plural: bool = False, rng: random.Random | None = None, noun: str = "object") -> str:
        """'large red circle', 'blue objects', ... ; rng picks synonyms ('big') when given."""
        parts = []
        if self.size is not None:
            parts.append(rng.choice(SIZE_SYNONYMS[self.size]) if rng else self.size)
        if self.color is not None:
            parts.append(self.color)
        head = self.shape if self.shape is not None else noun
        parts.append(head + "s" if plural else head)
        return " ".join(parts)


def describe(obj: ShapeObject, attributes: tuple[str, ...]) -> Description:
    return Description(**{a: getattr(obj, a) for a in attributes})


ATTRIBUTE_SETS = (
    ("shape",),
    ("color",),
    ("size",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color"),
    ("size", "color", "shape"),
)


def unique_descriptions(scene: Scene, obj: ShapeObject, *, without: str | None = None) -> list[Description]:
    """Every description that picks out exactly this object (and does not name `without`)."""
    found = []
    for attributes in ATTRIBUTE_SETS:
        if without in attributes:
            continue
        d = describe(obj, attributes)
        if d.count(scene) == 1:
            found.append(d)
    return found


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def quantity(count: int, description: Description, rng: random.Random, noun: str) -> str:
    """'a red circle' / 'three red circles'."""
    if count == 1:
        return with_article(description.words(rng=rng, noun=noun))
    return f"{NUMBER_WORDS[count]} {description.words(plural=True, rng=rng, noun=noun)}"


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[0].upper() + text[1:] + "."


def clearly_extreme(scene: Scene, word: str) -> ShapeObject | None:
    """The object that is clearly leftmost/rightmost/... or None when two are too close to call."""
    if len(scene.objects) < 2:
        return None
    key = EXTREMES[word]
    first, second = sorted(scene.objects, key=key)[:2]
    return first if key(second) - key(first) >= EXTREME_MARGIN else None


def clear_relations(scene: Scene) -> list[tuple[ShapeObject, str, ShapeObject]]:
    return [
        (a, phrase, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b
        for phrase, holds in RELATIONS.items()
        if holds(a, b)
    ]


# --- captions ------------------------------------------------------------------------

LIST_LEVELS = (("shape",), ("color", "shape"), ("size", "color", "shape"), ("color",), ("size", "shape"))


def caption_inventory(scene: Scene, rng: random.Random) -> str:
    """Every object, grouped by one level of detail: 'two red circles and a blue star'."""
    attributes = rng.choice(LIST_LEVELS)
    noun = rng.choice(GENERIC_NOUNS)
    groups = Counter(describe(o, attributes) for o in scene.objects)
    items = [quantity(count, d, rng, noun) for d, count in groups.items()]
    rng.shuffle(items)
    total = len(scene.objects)
    opening = rng.choice(
        ["", "there {be} ", "an image of ", "a picture with ", "the scene shows ", "this image contains "]
    )
    opening = opening.replace("{be}", "is" if items[0].startswith(("a ", "an ")) else "are")
    ending = rng.choice(BACKGROUND_PHRASES) if opening in ("", "an image of ") else ""
    return sentence(f"{opening}{join_list(items)} {ending}" if total else "an empty scene")


def caption_total(scene: Scene, rng: random.Random) -> str:
    n = len(scene.objects)
    noun = rng.choice(GENERIC_NOUNS)
    if n == 1:
        obj = scene.objects[0]
        d = describe(obj, rng.choice(LIST_LEVELS[:3]))
        return sentence(f"a single {d.words(rng=rng)} {rng.choice(BACKGROUND_PHRASES)}")
    template = rng.choice(
        [
            "{n} {noun}s {bg}",
            "an image with {n} {noun}s",
            "there are {n} {noun}s in the picture",
            "{n} {noun}s including {example}",
        ]
    )
    example_obj = rng.choice(scene.objects)
    example = with_article(describe(example_obj, rng.choice(LIST_LEVELS[1:3])).words(rng=rng))
    return sentence(
        template.format(n=NUMBER_WORDS[n], noun=noun, bg=rng.choice(BACKGROUND_PHRASES), example=example)
    )


def caption_relation(scene: Scene, rng: random.Random) -> str | None:
    relations = clear_relations(scene)
    if not relations:
        return None
    a, phrase, b = rng.choice(relations)
    da = describe(a, rng.choice(LIST_LEVELS[:3]))
    db = describe(b, rng.choice(LIST_LEVELS[:3]))
    template = rng.choice(["{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}"])
    text = template.format(a=with_article(da.words(rng=rng)), rel=phrase, b=with_article(db.words(rng=rng)))
    return sentence(text)


def caption_extreme(scene: Scene, rng: random.Random) -> str | None:
    words = [w for w in EXTREMES if clearly_extreme(scene, w) is not None]
    if not words:
        return None
    word = rng.choice(words)
    obj = clearly_extreme(scene, word)
    d = describe(obj, rng.choice(LIST_LEVELS[1:3]))
    return sentence(f"the {word} {rng.choice(GENERIC_NOUNS)} is {with_article(d.words(rng=rng))}")


CAPTION_BUILDERS = (caption_inventory, caption_inventory, caption_total, caption_relation, caption_extreme)


def make_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """`count` different true captions of the scene, with varied wording and order."""
    captions: list[str] = []
    for _attempt in range(60):
        builder = CAPTION_BUILDERS[len(captions) % len(CAPTION_BUILDERS)] if _attempt < 10 else rng.choice(
            CAPTION_BUILDERS
        )
        text = builder(scene, rng)
        if text is not None and text not in captions:
            captions.append(text)
        if len(captions) == count:
            return captions
    raise RuntimeError(f"could not write {count} different captions for a scene of {len(scene.objects)} objects")


ALL_WORDS = (
    tuple(SHAPES)
    + tuple(COLORS)
    + tuple(SIZES)
    + tuple(w for pair in SIZE_SYNONYMS.values() for w in pair)
    + NUMBER_WORDS
    + GENERIC_NOUNS
)
