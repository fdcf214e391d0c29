"""Hard negative captions: a caption with a few words changed so that it no longer fits its image.

Contrastive models trained only on in-batch negatives learn captions as bags of words
(they cannot tell "a red circle left of a blue square" from "a blue circle left of a red
square"). NegCLIP (Yuksekgonul et al., 2023) adds such perturbed captions as extra
negatives. The perturbations here are plain English word edits, so they apply to any
caption data: flip spatial words, swap two colours or two nouns, change a number, a colour
or a size.
"""

from __future__ import annotations

import random
import re

OPPOSITES = {
    "left": "right", "right": "left", "above": "below", "below": "above", "over": "under", "under": "over",
    "top": "bottom", "bottom": "top", "leftmost": "rightmost", "rightmost": "leftmost",
    "topmost": "bottommost", "bottommost": "topmost",
}
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white", "black", "grey", "gray", "brown", "pink")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NOUNS = ("circle", "square", "triangle", "diamond", "star", "hexagon", "man", "woman", "boy", "girl", "dog", "cat",
         "horse", "car", "bus", "table", "chair", "bed", "tree", "ball", "cup", "plate")
SIZES = {"small": "large", "large": "small", "little": "big", "big": "little", "tiny": "huge", "huge": "tiny"}
_WORD = re.compile(r"[A-Za-z]+")


def _replace(caption: str, spans: list[tuple[int, int, str]]) -> str:
    for start, end, word in sorted(spans, reverse=True):
        original = caption[start:end]
        caption = caption[:start] + (word.capitalize() if original[:1].isupper() else word) + caption[end:]
    return caption


def hard_negative(caption: str, rng: random.Random) -> str | None:
    """A minimally edited caption that no longer describes the same scene, or None if no edit applies."""
    words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(caption)]
    edits = []
    spatial = [(s, e, OPPOSITES[w]) for s, e, w in words if w in OPPOSITES]
    if spatial:
        edits.append(spatial)  # flip every spatial word: the relation is reversed
    colours = [(s, e, w) for s, e, w in words if w in COLOURS]
    distinct = sorted({w for _, _, w in colours})
    if len(distinct) >= 2:
        a, b = rng.sample(distinct, 2)
        edits.append([(s, e, b if w == a else a) for s, e, w in colours if w in (a, b)])  # swap two colours
    if colours:
        s, e, w = rng.choice(colours)
        edits.append([(s, e, rng.choice([c for c in COLOURS[:8] if c not in distinct] or [w]))])
    numbers = [(s, e, w) for s, e, w in words if w in NUMBERS]
    if numbers:
        s, e, w = rng.choice(numbers)
        k = NUMBERS.index(w)
        edits.append([(s, e, NUMBERS[k + 1] if k == 0 or (k + 1 < len(NUMBERS) and rng.random() < 0.5) else NUMBERS[k - 1])])
    nouns = [(s, e, w) for s, e, w in words if w in NOUNS or (w.endswith("s") and w[:-1] in NOUNS)]
    singular = sorted({w.removesuffix("s") if w.removesuffix("s") in NOUNS else w for _, _, w in nouns})
    if len(singular) >= 2:  # swap two nouns: the attributes now bind to the wrong objects
        a, b = rng.sample(singular, 2)
        swap = []
        for s, e, w in nouns:
            base, plural = (w[:-1], "s") if w not in NOUNS else (w, "")
            if base in (a, b):
                swap.append((s, e, (b if base == a else a) + plural))
        edits.append(swap)
    if nouns:  # replace one noun by another of the list: the object is not what the caption says
        s, e, w = rng.choice(nouns)
        base, plural = (w[:-1], "s") if w not in NOUNS else (w, "")
        group = NOUNS[:6] if base in NOUNS[:6] else NOUNS[6:]
        edits.append([(s, e, rng.choice([n for n in group if n != base]) + plural)])
    sizes = [(s, e, SIZES[w]) for s, e, w in words if w in SIZES]
    if sizes:
        edits.append([rng.choice(sizes)])
    if not edits:
        return None
    negative = _replace(caption, rng.choice(edits))
    return negative if negative.lower() != caption.lower() else None
