"""The Shapes benchmark generator: determinism, correctness of every annotation, balance, splits."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from multimodal_models.cli import main
from multimodal_models.data import formats
from multimodal_models.shapes.generate import HELD_OUT_COMBOS, SPLITS, ShapesConfig, generate, load_manifest
from multimodal_models.shapes.claims import check_caption, fits, parse_caption
from multimodal_models.shapes.layout import read_scenes
from multimodal_models.shapes.questions import ANSWER_SPACES, DIALOGUE_TYPES, QUESTION_TYPES
from multimodal_models.shapes.world import COLORS, SHAPES, SIZES, Scene, ShapeObject

from .shapes_solver import solve

SMALL = ShapesConfig(seed=3, train=600, val=60, test=60, test_compositional=60)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate(SMALL, out, workers=2, progress=False)
    return out


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def scene_objects(dataset: Path, split: str) -> dict[int, list[dict]]:
    data = json.loads((dataset / f"scenes/{split}_scenes.json").read_text())
    return {s["image_id"]: s["objects"] for s in data["scenes"]}


def test_same_seed_writes_byte_identical_files_whatever_the_worker_count(dataset, tmp_path):
    again = tmp_path / "again"
    generate(SMALL, again, workers=1, progress=False)
    assert tree_digest(again) == tree_digest(dataset)


def test_another_seed_writes_another_dataset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    config = ShapesConfig(seed=1, train=20, val=0, test=0, test_compositional=0)
    generate(config, a, workers=1, progress=False)
    generate(ShapesConfig(seed=2, train=20, val=0, test=0, test_compositional=0), b, workers=1, progress=False)
    assert (a / "annotations/captions_train.json").read_bytes() != (b / "annotations/captions_train.json").read_bytes()


def test_every_vqa_answer_is_recomputed_from_the_scene_graph(dataset):
    for split in SPLITS:
        objects = scene_objects(dataset, split)
        files = load_manifest(dataset)["splits"][split]
        records = formats.read_vqa(dataset / files["vqa_questions"], dataset / files["vqa_annotations"],
                                   image_dir=dataset / files["images"])
        assert records
        for r in records:
            assert solve(objects[r.image_id], r.question) == r.answer, (split, r.question)
            assert set(r.answers) == {r.answer} and len(r.answers) == 10


DIALOGUE_FORMS = {
    "exist": r"<image>\nis there an? [a-z ]+\?",
    "query_it": r"what (color|shape|size) is it\?",
    "spatial_it": r"is it (above|below|to the (left|right) of) the [a-z ]+\?",
    "same_attribute_it": r"how many other objects have the same (color|shape|size) as it\?",
    "closest_it": r"what (color|shape|size) is the object closest to it\?",
    "query_other": r"and what (color|shape|size) is the [a-z ]+\?",
    "count": r"(<image>\n)?how many objects are there\?",
    "all_same": r"are they all the same (color|shape)\?",
}


def test_every_dialogue_turn_is_recomputed_and_refers_back(dataset):
    objects = scene_objects(dataset, "test")
    conversations = formats.read_llava(dataset / "dialogues/test.json", image_dir=dataset / "images")
    assert set(DIALOGUE_FORMS) == set(DIALOGUE_TYPES)
    forms = Counter(turn.question_type for conv in conversations for turn in conv.turns if turn.role == "user")
    assert set(forms) <= set(DIALOGUE_TYPES) and {"exist", "query_it", "spatial_it", "query_other"} <= set(forms)
    refers_back = 0
    for conv in conversations:
        image_id = int(conv.id)
        assert 3 <= len(conv.turns) // 2 <= 6
        assert conv.turns[0].text.startswith("<image>\n")
        state: dict = {}
        for user, assistant in zip(conv.turns[::2], conv.turns[1::2]):
            assert (user.role, assistant.role) == ("user", "assistant")
            assert re.fullmatch(DIALOGUE_FORMS[user.question_type], user.text.lower()), (user.question_type, user.text)
            assert assistant.question_type is None
            assert solve(objects[image_id], user.text, state) == assistant.text, user.text
            refers_back += " it" in user.text
            if "it" in state and (" it" in user.text or user.text.startswith("<image>")):  # grounded on "it"
                assert user.referents[0] == (tuple(state["it"]["position"]),), user.text
            assert user.referents and not assistant.referents and assistant.evidence is None
            if re.fullmatch(r"is it (above|below|to the (left|right) of) .*\?", user.text.lower()):  # yes: "it"
                assert user.evidence == (user.referents[0] if assistant.text == "yes" else ()), user.text
    assert refers_back > len(conversations)  # more than one back-reference per dialogue on average


def test_every_multiple_choice_answer_is_recomputed(dataset):
    objects = scene_objects(dataset, "test")
    records = formats.read_mmmu(dataset / "mmmu/Shapes/test-00000-of-00001.parquet")
    assert len(records) == 2 * SMALL.test
    for r in records:
        image_id = int(r.id.split("_")[-1]) // 10
        assert r.question.startswith("<image 1> ")
        assert len(r.images) == 1 and Image.open(__import__("io").BytesIO(r.images[0])).size == (64, 64)
        gold = r.options["ABCDEFGHI".index(r.answer)]
        assert solve(objects[image_id], r.question) == gold
        assert len(set(r.options)) == len(r.options) >= 2


def test_every_caption_is_true_of_its_scene(dataset):
    for split in SPLITS:
        scenes = read_scenes(dataset / f"scenes/{split}_scenes.json")
        for record in formats.read_coco_captions(dataset / f"annotations/captions_{split}.json", image_dir=dataset):
            assert len(record.captions) >= 5 and len(set(record.captions)) == len(record.captions)
            for caption in record.captions:
                check = check_caption(caption, scenes[record.image_id])
                assert check.claims, caption
                assert check.precision == 1.0 and not check.hallucinated, (caption, check)
                assert fits(parse_caption(caption), scenes[record.image_id]), caption  # the ceiling counts its own image


def test_an_inventory_fits_only_scenes_it_lists_completely():
    """The generator's inventories name every object, so the retrieval ceiling must not count a scene
    with more objects as fitting one; relations and "including" make no such promise."""
    red_circle, blue_star = ShapeObject("circle", "red", "small", 0.2, 0.2), ShapeObject("star", "blue", "large", 0.7, 0.7)
    two = Scene((red_circle, blue_star))
    three = Scene((red_circle, blue_star, ShapeObject("square", "green", "small", 0.2, 0.7)))
    inventory = parse_caption("This image contains a red circle and a blue star.")
    assert inventory.listing and fits(inventory, two) and not fits(inventory, three)
    assert check_caption("This image contains a red circle and a blue star.", three).precision == 1.0  # still true claims
    assert fits(parse_caption("Two shapes on a dark background."), two)
    assert not fits(parse_caption("Two shapes on a dark background."), three)
    assert not fits(parse_caption("There are two circles."), Scene((red_circle, ShapeObject("circle", "red", "small", 0.7, 0.2),
                                                                     blue_star)))
    for caption in ("A red circle to the left of a blue star.", "Three shapes including a blue star.",
                    "The topmost object is a red circle."):
        parsed = parse_caption(caption)
        assert not parsed.listing and fits(parsed, three), caption


def test_grounding_catches_false_and_hallucinated_claims(dataset):
    scenes = read_scenes(dataset / "scenes/test_scenes.json")
    scene = next(s for s in scenes.values() if len(s.objects) >= 2)
    present = scene.objects[0]
    absent_color = next(c for c in COLORS if all(o.color != c for o in scene.objects))
    check = check_caption(f"A {absent_color} {present.shape} and a {present.color} {present.shape}.", scene)
    assert check.hallucinated == (f"{absent_color} {present.shape}",)
    assert [c.holds for c in check.claims] == [False, True]
    n = sum(o.shape == present.shape for o in scene.objects)
    wrong_count = ["zero", "one", "two", "three", "four", "five", "six", "seven"][n + 1]
    check = check_caption(f"{wrong_count} {present.shape}s", scene)
    assert [c.kind for c in check.claims] == ["count"] and not check.claims[0].holds


def test_answers_are_balanced_within_each_question_type(dataset):
    stats = json.loads((dataset / "stats.json").read_text())
    assert set(stats["train_answer_balance"]) == set(QUESTION_TYPES)
    assert 0.45 <= stats["train_yes_share"] <= 0.55
    records = formats.read_vqa(dataset / "vqa/shapes_train_questions.json", dataset / "vqa/shapes_train_annotations.json",
                               image_dir=dataset / "images/train")
    groups: dict[tuple, Counter] = {}
    for r in records:
        space = next(name for name, values in ANSWER_SPACES.items() if r.answer in values)
        groups.setdefault((r.question_type, space), Counter())[r.answer] += 1
    for (qtype, space), answers in groups.items():
        share = max(answers.values()) / sum(answers.values())
        if space == "yes/no":
            assert share <= 0.58, (qtype, answers)  # no yes-bias (nor no-bias)
        elif space == "number":
            assert share <= 0.4, (qtype, answers)  # counts flattened as far as scenes of 1-6 objects allow
        else:  # colours, shapes, sizes, left/right, above/below
            assert share <= 1.5 / len(answers) + 0.05, (qtype, answers)  # no answer much above uniform


def test_stats_report_blind_baselines_per_question_type(dataset):
    stats = json.loads((dataset / "stats.json").read_text())
    for split in ("val", "test", "test_compositional"):
        blind = stats["blind_baseline"][split]
        assert set(blind["perQuestionType"]) == set(QUESTION_TYPES)
        assert 0 < blind["overall_best"] < 60  # a question-only model cannot do well
    assert stats["splits"]["train"]["questions"] >= 10 * SMALL.train


def test_questions_span_every_type_and_answer_type(dataset):
    records = formats.read_vqa(dataset / "vqa/shapes_val_questions.json", dataset / "vqa/shapes_val_annotations.json",
                               image_dir=dataset / "images/val")
    assert {r.question_type for r in records} == set(QUESTION_TYPES)
    assert {r.answer_type for r in records} == {"yes/no", "number", "other"}
    per_image = Counter(r.image_id for r in records)
    assert min(per_image.values()) >= 10


def test_compositional_split_holds_out_its_combinations(dataset):
    held_out_phrases = [re.compile(rf"\b{c}\s+(?:(?:small|little|large|big)\s+)?{s}s?\b") for c, s in HELD_OUT_COMBOS]
    for split in ("train", "val", "test"):
        for objects in scene_objects(dataset, split).values():
            assert not any((o["color"], o["shape"]) in HELD_OUT_COMBOS for o in objects)
        texts = (dataset / f"annotations/captions_{split}.json").read_text().lower()
        texts += (dataset / f"vqa/shapes_{split}_questions.json").read_text().lower()
        texts += (dataset / f"dialogues/{split}.json").read_text().lower()
        for phrase in held_out_phrases:
            assert not phrase.search(texts), (split, phrase.pattern)
    for objects in scene_objects(dataset, "test_compositional").values():
        assert any((o["color"], o["shape"]) in HELD_OUT_COMBOS for o in objects)


def test_world_has_the_promised_variety(dataset):
    objects = [o for objs in scene_objects(dataset, "train").values() for o in objs]
    assert {o["shape"] for o in objects} == set(SHAPES) and len(SHAPES) >= 5
    assert {o["color"] for o in objects} == set(COLORS) and len(COLORS) == 8
    assert {o["size"] for o in objects} == set(SIZES) == {"small", "large"}
    counts = Counter(len(objs) for objs in scene_objects(dataset, "train").values())
    assert set(counts) == {1, 2, 3, 4, 5, 6}
    positions = {tuple(o["position"]) for o in objects}
    assert len(positions) > 0.99 * len(objects)  # continuous, not a grid


def test_objects_do_not_overlap(dataset):
    for objs in scene_objects(dataset, "train").values():
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                ra, rb = a["bbox"][2] / 2, b["bbox"][2] / 2
                ca = (a["bbox"][0] + ra, a["bbox"][1] + ra)
                cb = (b["bbox"][0] + rb, b["bbox"][1] + rb)
                assert ((ca[0] - cb[0]) ** 2 + (ca[1] - cb[1]) ** 2) ** 0.5 > ra + rb


def test_readers_see_the_real_layouts(dataset):
    manifest = load_manifest(dataset)
    captions = formats.read_coco_captions(dataset / manifest["splits"]["val"]["captions"],
                                          image_dir=dataset / manifest["splits"]["val"]["images"], check_images=True)
    assert len(captions) == SMALL.val
    karpathy = formats.read_karpathy(dataset / manifest["karpathy"], image_root=dataset / "images")
    assert Counter(r.split for r in karpathy) == {s: SMALL.count(s) for s in SPLITS}
    raw = json.loads((dataset / manifest["splits"]["val"]["vqa_annotations"]).read_text())
    vqa_v2 = {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id"}
    assert all(vqa_v2 <= set(a) <= vqa_v2 | {"referents", "evidence"} for a in raw["annotations"])
    assert all("referents" in a for a in raw["annotations"])  # every question is grounded
    assert Image.open(captions[0].image).size == (64, 64)


def test_image_size_option(tmp_path):
    assert main(["shapes", "generate", str(tmp_path / "big"), "--train", "3", "--val", "1", "--test", "1",
                 "--compositional", "1", "--image-size", "128", "--hard", "--quiet"]) == 0
    image = next((tmp_path / "big/images/train").glob("*.png"))
    assert Image.open(image).size == (128, 128)
    assert main(["shapes", "generate", str(tmp_path / "bad"), "--image-size", "300"]) == 2


def test_preview_draws_a_picture(dataset, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["shapes", "preview", str(dataset), "--out", str(out), "--count", "8"]) == 0
    width, height = Image.open(out).size
    assert width > 600 and height > 400


def _is_description(text: str) -> bool:
    nouns = {s for s in SHAPES} | {s + "s" for s in SHAPES} | {"object", "objects", "shape", "shapes"}
    words = text.split()
    if text in ("color", "shape", "size"):  # the asked attribute, not a description
        return False
    return bool(words) and words[-1] in nouns and all(w in COLORS or w in ("small", "little", "large", "big")
                                                         for w in words[:-1])


def test_question_referents_are_the_objects_each_description_names(dataset):
    from .shapes_solver import RULES, matches, nearest, parse_description

    files = load_manifest(dataset)["splits"]["val"]
    objects = scene_objects(dataset, "val")
    records = formats.read_vqa(dataset / files["vqa_questions"], dataset / files["vqa_annotations"],
                               image_dir=dataset / files["images"])
    seen = Counter()
    for r in records:
        scene = objects[r.image_id]
        text = r.question.lower().rstrip("?").strip()
        groups = next(m.groups() for pattern, _ in RULES if (m := re.fullmatch(pattern, text)))
        named = [[tuple(o["position"]) for o in scene if matches(o, parse_description(g))]
                 for g in groups if g and _is_description(g)] or [[tuple(o["position"]) for o in scene]]
        got = [sorted(group) for group in r.referents]
        assert got == [sorted(group) for group in named], (r.question, r.referents)  # empty: none such
        if r.question_type in ("closest", "furthest"):
            anchor = next(o for o in scene if tuple(o["position"]) == r.referents[0][0])
            target = nearest(scene, anchor, furthest=r.question_type == "furthest")
            assert r.evidence == (tuple(target["position"]),)
        if r.question_type.startswith("query_"):
            assert r.evidence == r.referents[0] and len(r.evidence) == 1
            assert next(o for o in scene if tuple(o["position"]) == r.evidence[0])[r.question_type[6:]] == r.answer
        if r.question_type == "spatial":  # yes/no: A where it lies so; "left or right?": not annotated
            assert len(r.referents) == 2
            assert r.evidence == ((r.referents[0] if r.answer == "yes" else ()) if r.answer in ("yes", "no") else None)
        if r.question_type == "compare_size":  # A, where it is the larger (smaller) one
            assert r.evidence == (r.referents[0] if r.answer == "yes" else ())
        if r.question_type == "count":  # the counted objects; none is () (annotated: nothing), not None
            assert r.evidence is not None and len(r.evidence) == int(r.answer)
        if r.question_type == "same_attribute" and not text.startswith("how many"):  # B, where it matches A
            assert r.evidence == (r.referents[1] if r.answer == "yes" else ())
        seen[r.question_type] += 1
    assert set(seen) == set(QUESTION_TYPES)
