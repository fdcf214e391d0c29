"""An independent answerer for Shapes questions, used to check the generator.

It reads only what is on disk (the scene graph JSON and the question text) and knows
nothing of the generator's code: every wording is parsed here with its own regular
expressions and answered from object positions. It also checks that the question is
unambiguous: referring expressions pick out exactly one object, spatial relations are
not borderline, the nearest/furthest object is clearly so.
"""

from __future__ import annotations

import math
import re

SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
MARGIN = 0.10 - 1e-9  # the benchmark's promise: compared centres differ by at least this much
DISTANCE_MARGIN = 0.08 - 1e-9


class Ambiguous(AssertionError):
    pass


def parse_description(text: str) -> dict:
    words = text.split()
    noun = words[-1]
    d = {}
    if noun.rstrip("s") not in ("object", "shape"):
        d["shape"] = noun[:-1] if noun.endswith("s") and noun not in ("glass",) else noun
    for w in words[:-1]:
        if w in SIZE_WORDS:
            d["size"] = SIZE_WORDS[w]
        else:
            d["color"] = w
    return d


def matches(obj: dict, d: dict) -> bool:
    return all(obj[k] == v for k, v in d.items())


def count(objects, text):
    d = parse_description(text)
    return sum(matches(o, d) for o in objects)


def the(objects, text) -> dict:
    d = parse_description(text)
    found = [o for o in objects if matches(o, d)]
    if len(found) != 1:
        raise Ambiguous(f"'the {text}' matches {len(found)} objects")
    return found[0]


def pos(o):
    return o["position"]


def relation(a, b, phrase) -> bool:
    (ax, ay), (bx, by) = pos(a), pos(b)
    dx, dy = bx - ax, by - ay  # positive: b is right of / below a
    if phrase in ("to the left of", "to the right of"):
        if abs(dx) < MARGIN:
            raise Ambiguous(f"horizontal gap {abs(dx):.3f} below the margin")
        return dx > 0 if phrase == "to the left of" else dx < 0
    if abs(dy) < MARGIN:
        raise Ambiguous(f"vertical gap {abs(dy):.3f} below the margin")
    return dy > 0 if phrase == "above" else dy < 0


def dist(a, b):
    return math.dist(pos(a), pos(b))


def nearest(objects, anchor, furthest=False):
    others = sorted((o for o in objects if o is not anchor), key=lambda o: dist(anchor, o), reverse=furthest)
    if len(others) > 1 and abs(dist(anchor, others[0]) - dist(anchor, others[1])) < DISTANCE_MARGIN:
        raise Ambiguous("two objects are nearly equally near/far")
    return others[0]


def yn(value: bool) -> str:
    return "yes" if value else "no"


D = r"([a-z ]+?)"
RULES: list[tuple[str, callable]] = [
    (rf"is there (?:a|an|at least one) {D}", lambda o, s, d: yn(count(o, d) > 0)),
    (rf"are there any {D}", lambda o, s, d: yn(count(o, d) > 0)),
    (r"how many (?:objects|shapes) are (?:there|in the image)", lambda o, s: str(len(o))),
    (rf"how many other objects (?:are|have) the same (color|shape|size) as the {D}",
     lambda o, s, a, d: str(sum(x[a] == the(o, d)[a] for x in o if x is not the(o, d)))),
    (rf"how many {D} are (?:there|in the image)", lambda o, s, d: str(count(o, d))),
    (rf"what number of {D} are visible", lambda o, s, d: str(count(o, d))),
    (rf"what (color|shape|size) is the object (?:closest|nearest) to the {D}", lambda o, s, a, d: nearest(o, the(o, d))[a]),
    (rf"what (color|shape|size) is the object (?:furthest|farthest) from the {D}",
     lambda o, s, a, d: nearest(o, the(o, d), furthest=True)[a]),
    (r"what (color|shape|size) is the object closest to it", lambda o, s, a: nearest(o, s["it"])[a]),
    (rf"what (color|shape|size) is the {D}", lambda o, s, a, d: the(o, d)[a]),
    (rf"what is the (color|shape) of the {D}", lambda o, s, a, d: the(o, d)[a]),
    (rf"which color does the {D} have", lambda o, s, d: the(o, d)["color"]),
    (rf"is the {D} small or large", lambda o, s, d: the(o, d)["size"]),
    (rf"how big is the {D}", lambda o, s, d: the(o, d)["size"]),
    (rf"is the {D} to the left or to the right of the {D}",
     lambda o, s, a, b: "left" if relation(the(o, a), the(o, b), "to the left of") else "right"),
    (rf"is the {D} above or below the {D}", lambda o, s, a, b: "above" if relation(the(o, a), the(o, b), "above") else "below"),
    (rf"is the {D} (to the left of|to the right of|above|below) the {D}",
     lambda o, s, a, p, b: yn(relation(the(o, a), the(o, b), p))),
    (rf"is the {D} the same color as the {D}", lambda o, s, a, b: yn(the(o, a)["color"] == the(o, b)["color"])),
    (rf"does the {D} have the same shape as the {D}", lambda o, s, a, b: yn(the(o, a)["shape"] == the(o, b)["shape"])),
    (rf"are the {D} and the {D} the same size", lambda o, s, a, b: yn(the(o, a)["size"] == the(o, b)["size"])),
    (rf"are there more {D} than {D}", lambda o, s, a, b: yn(count(o, a) > count(o, b))),
    (rf"are there fewer {D} than {D}", lambda o, s, a, b: yn(count(o, a) < count(o, b))),
    (rf"are there as many {D} as {D}", lambda o, s, a, b: yn(count(o, a) == count(o, b))),
    (rf"is the {D} (larger|smaller) than the {D}",
     lambda o, s, a, r, b: yn((the(o, a)["size"], the(o, b)["size"]) == (("large", "small") if r == "larger" else ("small", "large")))),
    # dialogue turns that refer back to the current object ("it")
    (r"what (color|shape|size) is it", lambda o, s, a: s["it"][a]),
    (rf"is it (to the left of|to the right of|above|below) the {D}", lambda o, s, p, d: yn(relation(s["it"], the(o, d), p))),
    (rf"and what (color|shape|size) is the {D}", lambda o, s, a, d: _switch(s, the(o, d))[a]),
    (r"how many other objects have the same (color|shape|size) as it",
     lambda o, s, a: str(sum(x[a] == s["it"][a] for x in o if x is not s["it"]))),
    (r"are they all the same (color|shape)", lambda o, s, a: yn(len({x[a] for x in o}) == 1)),
]


def _switch(state, obj):
    state["it"] = obj
    return obj


def solve(objects: list[dict], question: str, state: dict | None = None) -> str:
    """The answer to `question` about the scene; `state` carries the dialogue's referent."""
    state = {} if state is None else state
    text = question.replace("<image>", "").replace("<image 1>", "").strip().lower().rstrip("?").strip()
    for pattern, rule in RULES:
        m = re.fullmatch(pattern, text)
        if m:
            answer = rule(objects, state, *m.groups())
            if pattern.startswith("is there") and answer == "yes" and count(objects, m.group(1)) == 1:
                state["it"] = the(objects, m.group(1))  # the dialogue's opening turn
            return answer
    raise AssertionError(f"no rule understands the question {question!r}")
