"""Fairness: `evaluate --group-by FIELD` gives every per-item metric per group of a table column, a VQA
annotation field or (on Shapes) an attribute of the objects a question names, with the worst group,
the largest gap and bootstrap intervals that flag a real gap and leave equal groups alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal_models.cli import main
from multimodal_models.data.preprocess import ImageProcessor
from multimodal_models.data.splits import DataConfig, SplitFiles, load_split
from multimodal_models.errors import MultimodalError
from multimodal_models.evaluate.groups import group_table, item_scores
from multimodal_models.evaluate.report import evaluate_model
from multimodal_models.shapes.evaluation import SceneGroups


@pytest.fixture(autouse=True)
def no_meteor(monkeypatch):
    """METEOR runs a Java process for seconds per report; nothing here needs it."""
    monkeypatch.setattr("multimodal_models.evaluate.report.java_available", lambda: False)


class Constant(torch.nn.Module):
    """Answers every question with one answer, and captions every image with one caption."""

    model_type = "constant"

    def __init__(self, answer: str = "yes", caption: str = "a black square"):
        super().__init__()
        self.answer, self.caption = answer, caption
        self.image_processor = ImageProcessor(size={"height": 8, "width": 8})

    def answer_batch(self, questions, pixels):
        return [self.answer] * len(questions)

    def caption_batch(self, pixels):
        return [self.caption] * len(pixels)


def test_group_table_by_hand():
    # items: a a a b b b+c (the last item is in two groups), and one item in no group
    scores = [100, 0, 100, 100, 0, 0, 50]
    memberships = [("a",), ("a",), ("a",), ("b",), ("b",), ("b", "c"), ()]
    t = group_table(scores, memberships, resamples=200, seed=1, min_n=1)
    assert {g: (x["value"], x["n"]) for g, x in t["groups"].items()} == {
        "a": (round(200 / 3, 4), 3), "b": (round(100 / 3, 4), 3), "c": (0.0, 1)}
    assert t["ungrouped"] == 1
    assert t["groups"]["a"]["vs_rest"] == round(200 / 3 - 150 / 4, 4)  # the rest: 100, 0, 0, 50
    assert t["worst"] == {"group": "c", "value": 0.0} and t["best"] == {"group": "a", "value": round(200 / 3, 4)}
    assert t["gap"] == round(200 / 3, 4)
    # groups under min_n items are listed but compete for neither end
    t = group_table(scores, memberships, resamples=200, seed=1, min_n=2)
    assert t["worst"]["group"] == "b" and t["gap"] == round(100 / 3, 4) and not t["groups"]["c"]["flagged"]
    # seeded: the same intervals every time
    assert group_table(scores, memberships, resamples=200, seed=1) == group_table(scores, memberships, resamples=200, seed=1)


def test_the_bootstrap_flags_a_real_gap_and_not_equal_groups():
    real = group_table([100.0] * 60 + [0.0] * 60, [("good",)] * 60 + [("bad",)] * 60)
    assert real["gap"] == 100.0 and real["gap_ci"] == [100.0, 100.0] and real["gap_exceeds_noise"]
    assert real["groups"]["bad"]["flagged"] and real["groups"]["bad"]["vs_rest"] == -100.0
    # a smaller real gap (80% against 40% over 50 items each) still clears the noise
    rng = np.random.default_rng(0)
    strong = list(rng.permutation([100.0] * 40 + [0.0] * 10)) + list(rng.permutation([100.0] * 20 + [0.0] * 30))
    t = group_table(strong, [("x",)] * 50 + [("y",)] * 50)
    assert t["gap"] == 40.0 and t["gap_exceeds_noise"] and t["gap_ci"][0] > 0
    # equal groups: the same 50/50 items in each, interleaved
    equal = group_table([100.0, 0.0] * 60, [("x",), ("x",), ("y",), ("y",)] * 30)
    assert equal["gap"] == 0.0 and not equal["gap_exceeds_noise"]
    assert equal["gap_ci"][0] < 0 < equal["gap_ci"][1]
    assert not any(g["flagged"] for g in equal["groups"].values())
    # and a small difference that sampling noise explains (55% against 45% over 20 items each)
    noisy = group_table([100.0] * 11 + [0.0] * 9 + [100.0] * 9 + [0.0] * 11, [("x",)] * 20 + [("y",)] * 20)
    assert noisy["gap"] == 10.0 and not noisy["gap_exceeds_noise"]


def black_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", (16, 16), (0, 0, 0)).save(folder / f"{k + 1}.png")


def test_group_by_a_table_column(tmp_path):
    black_images(tmp_path, 6)
    rows = [  # a constant "yes": north 2 of 3 right, south 0 of 2, one row without the column
        {"image": "1.png", "question": "q?", "answer": "yes", "site": "north"},
        {"image": "2.png", "question": "q?", "answer": "yes", "site": "north"},
        {"image": "3.png", "question": "q?", "answer": "no", "site": "north"},
        {"image": "4.png", "question": "q?", "answer": "no", "site": "south"},
        {"image": "5.png", "question": "q?", "answer": "no", "site": "south"},
        {"image": "6.png", "question": "q?", "answer": "yes"},
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate_model(Constant(), SplitFiles(table=str(table)), tmp_path / "out", progress=False,
                             group_by=("site",), resamples=100)
    t = results["groups"]["site"]["vqa"]["accuracy"]
    assert {g: (x["value"], x["n"]) for g, x in t["groups"].items()} == {"north": (round(200 / 3, 4), 3),
                                                                         "south": (0.0, 2)}
    assert t["ungrouped"] == 1 and t["worst"]["group"] == "south" and t["gap"] == round(200 / 3, 4)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["groups"]["site"]["vqa"]["accuracy"]["groups"]["south"]["n"] == 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "### vqa accuracy by site" in report
    assert "| south | 0 | 2 |" in report and "| north | 66.67 | 3 |" in report
    assert "Worst group **south** (0); largest gap **66.67** (north − south" in report


def test_group_by_a_csv_caption_column_gives_per_image_cider_whose_mean_is_the_overall(tmp_path):
    black_images(tmp_path, 4)
    lines = ["image,caption,light"]
    for k, (caption, light) in enumerate([("a black square", "dim"), ("a black square", "dim"),
                                          ("a white circle", "lit"), ("two red stars", "lit")], start=1):
        lines += [f"{k}.png,{caption},{light}", f"{k}.png,a dark picture,{light}"]
    table = tmp_path / "c.csv"
    table.write_text("\n".join(lines) + "\n")
    results = evaluate_model(Constant(), SplitFiles(table=str(table)), tmp_path / "out", progress=False,
                             group_by=("light",), resamples=100)
    split = load_split(DataConfig(eval=SplitFiles(table=str(table))), "eval")
    ids, metrics, _ = item_scores(results, split)["captions"]
    assert np.isclose(metrics["CIDEr"].mean(), results["captions"]["CIDEr"])
    assert np.isclose(metrics["ROUGE-L"].mean(), results["captions"]["ROUGE-L"])
    t = results["groups"]["light"]["captions"]["CIDEr"]
    per_image = dict(zip(ids, metrics["CIDEr"]))
    assert t["groups"]["dim"]["n"] == 2 and t["groups"]["lit"]["n"] == 2
    assert t["groups"]["dim"]["value"] == round((per_image["1.png"] + per_image["2.png"]) / 2, 4)
    assert t["worst"]["group"] == "lit"


def vqa_pair(folder: Path) -> tuple[Path, Path]:
    """A VQA v2 pair of 5 questions whose annotations carry an extra field, "source"."""
    black_images(folder, 5)
    gold = ["yes", "yes", "no", "yes", "no"]
    sources = ["web", "web", "web", "camera", "camera"]
    types = ["yes/no", "yes/no", "yes/no", "yes/no", "other"]
    questions = {"info": {}, "license": {}, "data_subtype": "val", "task_type": "Open-Ended", "data_type": "mscoco",
                 "questions": [{"image_id": k + 1, "question": "is it?", "question_id": 10 + k} for k in range(5)]}
    annotations = {"info": {}, "license": {}, "data_subtype": "val", "data_type": "mscoco", "annotations": [
        {"image_id": k + 1, "question_id": 10 + k, "question_type": "is it", "answer_type": types[k],
         "multiple_choice_answer": gold[k], "source": sources[k],
         "answers": [{"answer": gold[k], "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]}
        for k in range(5)]}
    (folder / "q.json").write_text(json.dumps(questions))
    (folder / "a.json").write_text(json.dumps(annotations))
    return folder / "q.json", folder / "a.json"


def test_group_by_vqa_annotation_fields(tmp_path, capsys):
    questions, annotations = vqa_pair(tmp_path)
    out = tmp_path / "out"
    import multimodal_models.cli as cli

    original = cli._load
    try:
        cli._load = lambda *a, **k: Constant()
        assert main(["evaluate", "--vqa-questions", str(questions), "--vqa-annotations", str(annotations),
                     "--out", str(out), "--quiet", "--group-by", "source", "--group-by", "answer_type",
                     "--bootstrap", "100"]) == 0
    finally:
        cli._load = original
    capsys.readouterr()
    groups = json.loads((out / "metrics.json").read_text())["groups"]
    source = groups["source"]["vqa"]["accuracy"]["groups"]  # "yes" is right on 2 of 3 web and 1 of 2 camera
    assert {g: (x["value"], x["n"]) for g, x in source.items()} == {"web": (round(200 / 3, 4), 3), "camera": (50.0, 2)}
    kinds = groups["answer_type"]["vqa"]["accuracy"]["groups"]  # a record field
    assert {g: (x["value"], x["n"]) for g, x in kinds.items()} == {"yes/no": (75.0, 4), "other": (0.0, 1)}


def test_an_unknown_field_is_refused_before_the_model_runs(tmp_path):
    questions, annotations = vqa_pair(tmp_path)

    class Refuses(Constant):
        def answer_batch(self, questions, pixels):
            raise AssertionError("the model ran")

    with pytest.raises(MultimodalError, match="--group-by colour: no record, annotation file or table column"):
        evaluate_model(Refuses(), SplitFiles(vqa_questions=str(questions), vqa_annotations=str(annotations)),
                       tmp_path / "out", progress=False, group_by=("colour",))


def test_shapes_groups_are_the_attributes_of_the_objects_a_question_names(tiny_shapes, tmp_path):
    split = load_split(DataConfig(root=str(tiny_shapes), eval_split="test"), "eval")
    values = SceneGroups().group_values(split, "color")
    # recount from the files: each annotation's referent centres against its scene's object positions
    scenes = {s["image_id"]: s for s in json.loads((tiny_shapes / "scenes" / "test_scenes.json").read_text())["scenes"]}
    annotations = json.loads((tiny_shapes / "vqa" / "shapes_test_annotations.json").read_text())["annotations"]
    expected = {}
    for a in annotations:
        colours = {o["color"] for o in scenes[a["image_id"]]["objects"]
                   for points in a.get("referents", []) for p in points if o["position"] == p}
        expected[a["question_id"]] = tuple(sorted(colours))
    assert values["vqa"] == expected
    assert any(len(v) > 1 for v in expected.values())
    # a question that names "the red ..." is in the red group
    for r in split.vqa:
        for colour in ("red", "blue", "green"):
            if f"the {colour} " in r.question:
                assert colour in values["vqa"][r.question_id], r.question
    # captions: every colour in the image
    assert values["captions"][split.captions[0].image_id] == tuple(sorted(
        {o["color"] for o in scenes[split.captions[0].image_id]["objects"]}))
    results = evaluate_model(Constant(answer="yes"), tiny_shapes, tmp_path / "out", progress=False,
                             extras=(SceneGroups(),), group_by=("color", "question_type"), resamples=100)
    by_colour = results["groups"]["color"]["vqa"]["accuracy"]["groups"]
    counts = Counter(c for v in expected.values() for c in v)
    assert {g: x["n"] for g, x in by_colour.items()} == dict(counts)
    yes_red = [r for r in split.vqa if "red" in expected[r.question_id]]
    assert by_colour["red"]["value"] == round(100 * sum(r.answer == "yes" for r in yes_red) / len(yes_red), 4)
    assert "captions" in results["groups"]["color"]
