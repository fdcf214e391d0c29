"""Questions, dialogues and multiple-choice items about a Shapes scene.

Every question type enumerates the questions it could ask of a scene, each with the
answer computed from the scene graph, grouped into strata (for example by how many
attributes the question names). The sampler picks a stratum, then an answer uniformly
among those the stratum offers, then a question with that answer; so within every
question type the answers are balanced, and the wording of a question says as little as
possible about its answer. `answer_question` recomputes any answer from the scene and the
question's parameters, which the tests use to check every annotation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from ..data.records import Points
from .language import (
    ATTRIBUTE_SETS,
    EXTREME_MARGIN,
    RELATIONS,
    Description,
    unique_descriptions,
    with_article,
)
from .world import COLORS, SHAPES, SIZES, Scene, ShapeObject

ATTRIBUTES = ("color", "shape", "size")
ANSWER_SPACES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "number": tuple(str(k) for k in range(7)),
    "yes/no": ("yes", "no"),
    "horizontal": ("left", "right"),
    "vertical": ("above", "below"),
}
QUESTION_TYPES = (
    "exist",
    "count",
    "query_color",
    "query_shape",
    "query_size",
    "spatial",
    "closest",
    "furthest",
    "same_attribute",
    "compare_count",
    "compare_size",
)
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
# Counting answers are drawn with these weights so that large counts (possible only in
# crowded scenes) are not rarer overall than small ones.
COUNT_WEIGHTS = {0: 1.0, 1: 1.0, 2: 1.6, 3: 2.6, 4: 4.0, 5: 6.0, 6: 9.0}


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    answer_type: str  # VQA's answer types: "yes/no" | "number" | "other"
    question_type: str
    answer_space: str  # key of ANSWER_SPACES the answer is drawn from
    # Where the question looks, as object centres (fractions of the image side), for grounding
    # supervision: referents[i] holds the objects the i-th description of the question names (one for
    # "the red circle", all of them for "red circles"); evidence, the objects the answer is read from
    # (the object closest to A, the counted ones, the one whose colour is asked; for a yes/no question
    # about named objects, those that bear out a yes: A where "is A below B?" holds, B where "is A
    # the same color as B?" does), empty where the answer rests on none ("how many ...?" 0, a no),
    # None where the question does not say ("are there more A than B?", "left or right?").
    referents: tuple[Points, ...] = ()
    evidence: Points | None = None


@dataclass(frozen=True)
class Candidate:
    stratum: str
    answer: str
    build: Callable[[random.Random], str]  # writes the question, choosing among its wordings
    answer_space: str
    referents: tuple[tuple[ShapeObject, ...], ...] = ()  # as Question's, the objects themselves
    evidence: tuple[ShapeObject, ...] | None = None


def centres(objects) -> Points:
    return tuple((round(o.x, 4), round(o.y, 4)) for o in objects)


def evidence_centres(objects) -> Points | None:
    """centres(objects), keeping None (no evidence annotated) apart from () (the answer rests on none)."""
    return None if objects is None else centres(objects)


def matching(scene: Scene, d: Description) -> tuple[ShapeObject, ...]:
    return tuple(o for o in scene.objects if d.matches(o))


def others_sharing(scene: Scene, obj: ShapeObject, attribute: str) -> tuple[ShapeObject, ...]:
    """The other objects with obj's value of `attribute`."""
    return tuple(o for o in scene.objects if o is not obj and getattr(o, attribute) == getattr(obj, attribute))


def answer_type_of(space: str) -> str:
    return {"yes/no": "yes/no", "number": "number"}.get(space, "other")


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


# --- candidates of each question type -------------------------------------------------


def all_descriptions(forbidden: frozenset) -> list[tuple[tuple[str, ...], Description]]:
    """Every description with 1-3 attributes whose (colour, shape) pair may be spoken of."""
    values = {"size": list(SIZES), "color": list(COLORS), "shape": list(SHAPES)}
    out = []
    for attributes in ATTRIBUTE_SETS:
        combos: list[dict] = [{}]
        for a in attributes:
            combos = [{**c, a: v} for c in combos for v in values[a]]
        for c in combos:
            d = Description(**c)
            if (d.color, d.shape) not in forbidden:
                out.append((attributes, d))
    return out


def referable(scene: Scene, forbidden: frozenset, without: str | None = None) -> list[tuple[ShapeObject, list]]:
    out = []
    for obj in scene.objects:
        ds = [d for d in unique_descriptions(scene, obj, without=without) if (d.color, d.shape) not in forbidden]
        if ds:
            out.append((obj, ds))
    return out


def the(d: Description) -> str:
    return "the " + d.words(noun="object")


def candidates_exist(scene, forbidden, descriptions):
    for attributes, d in descriptions:
        yield Candidate(
            "-".join(attributes),
            yes_no(d.count(scene) > 0),
            lambda rng, d=d: rng.choice(
                [
                    f"is there {with_article(d.words())}?",
                    f"are there any {d.words(plural=True)}?",
                    f"is there at least one {d.words()}?",
                ]
            ),
            "yes/no",
            referents=(matching(scene, d),),
            evidence=matching(scene, d),
        )


def candidates_count(scene, forbidden, descriptions):
    yield Candidate(
        "all",
        str(len(scene.objects)),
        lambda rng: rng.choice(["how many objects are there?", "how many shapes are in the image?"]),
        "number",
        referents=(tuple(scene.objects),),
        evidence=tuple(scene.objects),
    )
    for attributes, d in descriptions:
        yield Candidate(
            "-".join(attributes),
            str(d.count(scene)),
            lambda rng, d=d: rng.choice(
                [
                    f"how many {d.words(plural=True)} are there?",
                    f"how many {d.words(plural=True)} are in the image?",
                    f"what number of {d.words(plural=True)} are visible?",
                ]
            ),
            "number",
            referents=(matching(scene, d),),
            evidence=matching(scene, d),
        )


def _candidates_query(attribute):
    templates = {
        "color": ["what color is {ref}?", "what is the color of {ref}?", "which color does {ref} have?"],
        "shape": ["what shape is {ref}?", "what is the shape of {ref}?"],
        "size": ["what size is {ref}?", "is {ref} small or large?", "how big is {ref}?"],
    }[attribute]

    def candidates(scene, forbidden, descriptions):
        for obj, ds in referable(scene, forbidden, without=attribute):
            for d in ds:
                yield Candidate(
                    "",
                    getattr(obj, attribute),
                    lambda rng, d=d: rng.choice(templates).format(ref=the(d)),
                    attribute,
                    referents=((obj,),),
                    evidence=(obj,),
                )

    return candidates


def _pairs(scene, forbidden, without: str | None = None):
    """Ordered pairs of distinct objects that can both be referred to (without naming `without`)."""
    refs = referable(scene, forbidden, without=without)
    for a, das in refs:
        for b, dbs in refs:
            if a is not b:
                yield a, das, b, dbs


def candidates_spatial(scene, forbidden, descriptions):
    for a, das, b, dbs in _pairs(scene, forbidden):
        for phrase, holds in RELATIONS.items():
            if holds(a, b) or RELATIONS[OPPOSITE[phrase]](a, b):  # never ask about a borderline pair
                yield Candidate(
                    phrase,
                    yes_no(holds(a, b)),
                    lambda rng, das=das, dbs=dbs, phrase=phrase: (
                        f"is {the(rng.choice(das))} {phrase} {the(rng.choice(dbs))}?"
                    ),
                    "yes/no",
                    referents=((a,), (b,)),
                    evidence=(a,) if holds(a, b) else (),
                )
        if RELATIONS["to the left of"](a, b) or RELATIONS["to the right of"](a, b):
            yield Candidate(
                "horizontal",
                "left" if a.x < b.x else "right",
                lambda rng, das=das, dbs=dbs: (
                    f"is {the(rng.choice(das))} to the left or to the right of {the(rng.choice(dbs))}?"
                ),
                "horizontal",
                referents=((a,), (b,)),
            )
        if RELATIONS["above"](a, b) or RELATIONS["below"](a, b):
            yield Candidate(
                "vertical",
                "above" if a.y < b.y else "below",
                lambda rng, das=das, dbs=dbs: f"is {the(rng.choice(das))} above or below {the(rng.choice(dbs))}?",
                "vertical",
                referents=((a,), (b,)),
            )


def _candidates_distance(op):
    phrases = {"closest": ("closest to", "nearest to"), "furthest": ("furthest from", "farthest from")}[op]

    def candidates(scene, forbidden, descriptions):
        for anchor, ds in referable(scene, forbidden):
            others = sorted((o for o in scene.objects if o is not anchor), key=anchor.distance)
            if not others:
                continue
            if len(others) > 1:
                gap = anchor.distance(others[1]) - anchor.distance(others[0]) if op == "closest" else (
                    anchor.distance(others[-1]) - anchor.distance(others[-2])
                )
                if gap < EXTREME_MARGIN:
                    continue
            target = others[0] if op == "closest" else others[-1]
            for attribute in ATTRIBUTES:
                yield Candidate(
                    attribute,
                    getattr(target, attribute),
                    lambda rng, ds=ds, attribute=attribute: (
                        f"what {attribute} is the object {rng.choice(phrases)} {the(rng.choice(ds))}?"
                    ),
                    attribute,
                    referents=((anchor,),),
                    evidence=(target,),
                )

    return candidates


def candidates_same_attribute(scene, forbidden, descriptions):
    wording = {
        "color": ("is {a} the same color as {b}?", "how many other objects are the same color as {a}?"),
        "shape": ("does {a} have the same shape as {b}?", "how many other objects have the same shape as {a}?"),
        "size": ("are {a} and {b} the same size?", "how many other objects are the same size as {a}?"),
    }
    for attribute in ATTRIBUTES:  # naming the compared attribute would give the answer away
        for a, das, b, dbs in _pairs(scene, forbidden, without=attribute):
            same = getattr(a, attribute) == getattr(b, attribute)
            yield Candidate(
                "pair-" + attribute,
                yes_no(same),
                lambda rng, das=das, dbs=dbs, attribute=attribute: wording[attribute][0].format(
                    a=the(rng.choice(das)), b=the(rng.choice(dbs))
                ),
                "yes/no",
                referents=((a,), (b,)),
                evidence=(b,) if same else (),  # B where it shares A's value, as "how many other" counts
            )
    for a, das in referable(scene, forbidden):
        for attribute in ATTRIBUTES:
            yield Candidate(
                "count-" + attribute,
                str(len(others_sharing(scene, a, attribute))),
                lambda rng, das=das, attribute=attribute: wording[attribute][1].format(a=the(rng.choice(das))),
                "number",
                referents=((a,),),
                evidence=others_sharing(scene, a, attribute),
            )


def candidates_compare_count(scene, forbidden, descriptions):
    by_attributes = defaultdict(list)
    for attributes, d in descriptions:
        if len(attributes) == 1:
            by_attributes[attributes].append(d)
    wording = {
        "more": "are there more {a} than {b}?",
        "fewer": "are there fewer {a} than {b}?",
        "equal": "are there as many {a} as {b}?",
    }
    for ds in by_attributes.values():
        for da in ds:
            for db in ds:
                if da == db or (da.count(scene) == 0 and db.count(scene) == 0):
                    continue
                na, nb = da.count(scene), db.count(scene)
                for relation, holds in (("more", na > nb), ("fewer", na < nb), ("equal", na == nb)):
                    yield Candidate(
                        relation,
                        yes_no(holds),
                        lambda rng, da=da, db=db, relation=relation: wording[relation].format(
                            a=da.words(plural=True), b=db.words(plural=True)
                        ),
                        "yes/no",
                        referents=(matching(scene, da), matching(scene, db)),
                    )


def candidates_compare_size(scene, forbidden, descriptions):
    for a, das, b, dbs in _pairs(scene, forbidden, without="size"):
        for relation in ("larger", "smaller"):
            holds = (a.size, b.size) == (("large", "small") if relation == "larger" else ("small", "large"))
            yield Candidate(
                relation,
                yes_no(holds),
                lambda rng, das=das, dbs=dbs, relation=relation: f"is {the(rng.choice(das))} {relation} than {the(rng.choice(dbs))}?",
                "yes/no",
                referents=((a,), (b,)),
                evidence=(a,) if holds else (),
            )


CANDIDATES = {
    "exist": candidates_exist,
    "count": candidates_count,
    "query_color": _candidates_query("color"),
    "query_shape": _candidates_query("shape"),
    "query_size": _candidates_query("size"),
    "spatial": candidates_spatial,
    "closest": _candidates_distance("closest"),
    "furthest": _candidates_distance("furthest"),
    "same_attribute": candidates_same_attribute,
    "compare_count": candidates_compare_count,
    "compare_size": candidates_compare_size,
}


def pick_balanced(candidates: list[Candidate], rng: random.Random) -> Candidate | None:
    """Choose a question so that, over the dataset, answers are balanced within the type.

    First an answer space (yes/no, number, colour...) among those the type offers. Then:
    yes/no: a stratum (a wording family) that offers both answers and a coin flip, so the
    wording never gives the answer away (no such stratum: nothing is asked); numbers: the
    answer first, weighted so that large counts, possible only in crowded scenes, are not
    rarer overall, then a stratum offering it (a single possible answer: nothing is asked); other answers: a stratum, then an answer
    uniformly.
    """
    if not candidates:
        return None
    spaces: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        spaces[c.answer_space].append(c)
    space = rng.choice(sorted(spaces))
    strata: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in spaces[space]:
        strata[c.stratum][c.answer].append(c)
    if space == "number":
        answers = sorted({c.answer for c in spaces[space]})
        if len(answers) < 2:
            return None
        answer = rng.choices(answers, [COUNT_WEIGHTS[int(a)] for a in answers])[0]
        stratum = rng.choice(sorted(name for name, by_answer in strata.items() if answer in by_answer))
        return rng.choice(strata[stratum][answer])
    names = sorted(strata)
    if space == "yes/no":
        names = [n for n in names if len(strata[n]) == 2]
        if not names:
            return None
    by_answer = strata[rng.choice(names)]
    return rng.choice(by_answer[rng.choice(sorted(by_answer))])


def make_questions(scene: Scene, rng: random.Random, count: int, forbidden: frozenset = frozenset()) -> list[Question]:
    """`count` different questions, cycling through the question types in a random order."""
    descriptions = all_descriptions(forbidden)
    pools = {t: list(CANDIDATES[t](scene, forbidden, descriptions)) for t in QUESTION_TYPES}
    order = [t for t in QUESTION_TYPES if pools[t]]
    rng.shuffle(order)
    questions: list[Question] = []
    seen: set[str] = set()
    for attempt in range(count * 6):
        qtype = order[attempt % len(order)]
        chosen = pick_balanced(pools[qtype], rng)
        if chosen is None:
            continue
        text = chosen.build(rng)
        if text in seen:
            continue
        seen.add(text)
        pools[qtype].remove(chosen)
        questions.append(
            Question(text, chosen.answer, answer_type_of(chosen.answer_space), qtype, chosen.answer_space,
                     tuple(centres(group) for group in chosen.referents), evidence_centres(chosen.evidence))
        )
        if len(questions) == count:
            break
    return questions


# --- dialogues -------------------------------------------------------------------------



def named_attributes(d: Description) -> set[str]:
    return {a for a in ATTRIBUTES if getattr(d, a) is not None}


@dataclass(frozen=True)
class DialogueTurn:
    """A dialogue's question and answer, with where the question looks (as Question's)."""

    question: str
    answer: str
    # the form of the question, for accuracy per form (DIALOGUE_TYPES)
    question_type: str
    referents: tuple[Points, ...] = ()
    evidence: Points | None = None


# The forms of a dialogue's questions ("it": the object the dialogue is about at that turn).
DIALOGUE_TYPES = {
    "exist": "is there a small red circle?  (the opening turn)",
    "query_it": "what color is it?",
    "spatial_it": "is it above the star?",
    "same_attribute_it": "how many other objects have the same size as it?",
    "closest_it": "what shape is the object closest to it?",
    "query_other": "and what color is the star?  (the conversation moves to the star)",
    "count": "how many objects are there?  (identical twins only: nothing can be singled out)",
    "all_same": "are they all the same color?  (identical twins only)",
}


def make_dialogue(scene: Scene, rng: random.Random, forbidden: frozenset = frozenset()) -> list[DialogueTurn]:
    """3-6 turns in which later turns refer back to an object as "it".

    The first turn introduces a uniquely described object; a follow-up either asks about
    "it" or moves the conversation to another object ("and what color is the star?"),
    which "it" then means.
    """
    refs = referable(scene, forbidden)
    everything = (centres(scene.objects),)
    if not refs:  # identical twins and nothing else: nothing can be singled out
        return [
            DialogueTurn("how many objects are there?", str(len(scene.objects)), "count", everything, everything[0]),
            DialogueTurn("are they all the same color?", yes_no(len({o.color for o in scene.objects}) == 1), "all_same",
                         everything),
            DialogueTurn("are they all the same shape?", yes_no(len({o.shape for o in scene.objects}) == 1), "all_same",
                         everything),
        ]
    n_turns = rng.randint(3, 6)
    obj, descriptions = rng.choice(refs)
    d = rng.choice(descriptions)
    turns = [DialogueTurn(f"is there {with_article(d.words())}?", "yes", "exist", (centres([obj]),), centres([obj]))]
    known = named_attributes(d)
    for _attempt in range(20):
        if len(turns) == n_turns:
            break
        turn, known_after, referent = rng.choice(_follow_ups(scene, obj, known, refs, rng))
        if turn.question in (t.question for t in turns):
            continue
        turns.append(turn)
        obj, known = referent, known_after
    return turns


def _follow_ups(scene: Scene, obj: ShapeObject, known: set[str], refs, rng: random.Random) -> list[tuple]:
    """Possible next turns: (turn, attributes known afterwards, referent afterwards)."""
    it = centres([obj])
    options = [(DialogueTurn(f"what {a} is it?", getattr(obj, a), "query_it", (it,), it), known | {a}, obj)
               for a in ATTRIBUTES if a not in known]
    for other, descriptions in refs:
        if other is obj:
            continue
        d = descriptions[0]
        phrase = rng.choice(list(RELATIONS))
        if RELATIONS[phrase](obj, other) or RELATIONS[OPPOSITE[phrase]](obj, other):
            holds = RELATIONS[phrase](obj, other)
            turn = DialogueTurn(f"is it {phrase} {the(d)}?", yes_no(holds), "spatial_it", (it, centres([other])),
                                it if holds else ())
            options.append((turn, known, obj))
        unnamed = [a for a in ATTRIBUTES if a not in named_attributes(d)]
        if unnamed:
            a = rng.choice(unnamed)
            turn = DialogueTurn(f"and what {a} is {the(d)}?", getattr(other, a), "query_other", (centres([other]),),
                                centres([other]))
            options.append((turn, named_attributes(d) | {a}, other))
    a = rng.choice(ATTRIBUTES)
    same = others_sharing(scene, obj, a)
    turn = DialogueTurn(f"how many other objects have the same {a} as it?", str(len(same)), "same_attribute_it",
                        (it,), centres(same))
    options.append((turn, known, obj))
    nearest = sorted((o for o in scene.objects if o is not obj), key=obj.distance)
    if len(nearest) == 1 or (len(nearest) > 1 and obj.distance(nearest[1]) - obj.distance(nearest[0]) >= EXTREME_MARGIN):
        a = rng.choice(ATTRIBUTES)
        turn = DialogueTurn(f"what {a} is the object closest to it?", getattr(nearest[0], a), "closest_it", (it,),
                            centres(nearest[:1]))
        options.append((turn, known, obj))
    return options


# --- multiple choice (MMMU layout) -------------------------------------------------------

SUBFIELDS = {
    "exist": "Existence",
    "count": "Counting",
    "query_color": "Attributes",
    "query_shape": "Attributes",
    "query_size": "Attributes",
    "spatial": "Spatial relations",
    "closest": "Relations",
    "furthest": "Relations",
    "same_attribute": "Relations",
    "compare_count": "Comparison",
    "compare_size": "Comparison",
}
LETTERS = "ABCDEFGHI"


def make_multiple_choice(question: Question, rng: random.Random, n_options: int = 4) -> tuple[str, list[str], str]:
    """(question text with the <image 1> marker, options, answer letter) for an MMMU-style item."""
    space = [a for a in ANSWER_SPACES[question.answer_space] if a != question.answer]
    options = rng.sample(space, min(n_options - 1, len(space))) + [question.answer]
    rng.shuffle(options)
    text = "<image 1> " + question.question[0].upper() + question.question[1:]
    return text, options, LETTERS[options.index(question.answer)]
