"""Robustness: the image corruptions (deterministic, ordered by severity, applied before the model's
preprocessing), `evaluate --corruptions`' table, figures and plot, and the Shapes question paraphrases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal_models.cli import main
from multimodal_models.data.preprocess import ImageProcessor
from multimodal_models.data.records import MultipleChoiceRecord
from multimodal_models.data.splits import ImageStore, SplitData
from multimodal_models.evaluate.corruptions import (
    CORRUPTIONS,
    PARAMETERS,
    Corruption,
    CorruptingProcessor,
    corrupt,
    parse_corruptions,
)
from multimodal_models.evaluate.report import corrupted_split, evaluate_model
from multimodal_models.shapes.evaluation import ParaphraseRobustness
from multimodal_models.shapes.paraphrases import paraphrases, pick

from .shapes_solver import solve


@pytest.fixture(autouse=True)
def no_meteor(monkeypatch):
    """METEOR runs a Java process for seconds per report; nothing here needs it."""
    monkeypatch.setattr("multimodal_models.evaluate.report.java_available", lambda: False)


def textured(side: int = 64, seed: int = 3, block: int = 8) -> Image.Image:
    """Coloured blocks with edges: something each corruption visibly changes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(30, 226, size=(side // block, side // block, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((block, block, 1), dtype=np.uint8)), "RGB")


def change(image: Image.Image, corrupted: Image.Image) -> float:
    return float(np.abs(np.asarray(corrupted, dtype=float) - np.asarray(image, dtype=float)).mean())


def test_every_corruption_is_deterministic_given_seed_and_key():
    image = textured()
    for name in CORRUPTIONS:
        for severity in (1, 5):
            a, b = corrupt(image, name, severity, seed=7, key="x.png"), corrupt(image, name, severity, seed=7, key="x.png")
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
            assert a.size == image.size and a.mode == "RGB"
    noise = lambda **kw: np.asarray(corrupt(image, "gaussian_noise", 3, **kw))  # noqa: E731
    assert not np.array_equal(noise(seed=7, key="x.png"), noise(seed=8, key="x.png"))  # the seed draws the noise
    assert not np.array_equal(noise(seed=7, key="x.png"), noise(seed=7, key="y.png"))  # and each image its own


def test_more_severe_changes_the_image_more():
    image = textured(block=1)  # per-pixel detail, which no pixelation grid lines up with
    for name in ("gaussian_noise", "gaussian_blur", "brightness", "contrast", "pixelate"):
        changes = [change(image, corrupt(image, name, s, key="x")) for s in (1, 2, 3, 4, 5)]
        assert changes == sorted(changes) and changes[0] > 0 and changes[4] > 1.5 * changes[0], (name, changes)
    jpeg = [change(image, corrupt(image, "jpeg", s)) for s in (1, 5)]
    assert 0 < jpeg[0] < jpeg[1]
    assert [PARAMETERS["jpeg"][s - 1] for s in (1, 2, 3, 4, 5)] == [65, 58, 50, 40, 25]


def test_exact_pixels_of_the_deterministic_corruptions():
    image = Image.new("RGB", (4, 4), (100, 50, 0))
    image.paste((0, 0, 0), (0, 0, 2, 4))  # left half black
    # brightness +0.1 on HSV's value: (100, 50, 0) has V = 100/255 -> V' = V + 0.1, colour scaled by V'/V
    bright = np.asarray(corrupt(image, "brightness", 1))
    scale = (100 / 255 + 0.1) / (100 / 255)
    assert bright[0, 3].tolist() == [round(100 * scale), round(50 * scale), 0]
    assert bright[0, 0].tolist() == [round(0.1 * 255)] * 3  # black (saturation 0) turns grey
    # contrast x0.4 about the image's mean per channel
    low = np.asarray(corrupt(image, "contrast", 1), dtype=float)
    means = np.array([50, 25, 0]) / 255
    expected = np.rint(255 * ((np.array([100, 50, 0]) / 255 - means) * 0.4 + means))
    assert low[0, 3].tolist() == expected.tolist()
    # pixelate at severity 5 halves the side with a box filter: each 2x2 block becomes its mean
    pixelated = np.asarray(corrupt(textured(8), "pixelate", 5), dtype=float)
    assert np.allclose(pixelated[0:2, 0:2], pixelated[0, 0])
    # blur spreads the black-to-colour edge, and leaves a flat image flat
    flat = Image.new("RGB", (16, 16), (90, 120, 30))
    assert np.array_equal(np.asarray(corrupt(flat, "gaussian_blur", 5)), np.asarray(flat))


def test_unknown_names_and_severities_are_refused():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(textured(), "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        Corruption("jpeg", 6)
    assert parse_corruptions(None) == CORRUPTIONS == parse_corruptions("all")
    assert parse_corruptions("jpeg, contrast") == ("jpeg", "contrast")
    with pytest.raises(ValueError, match="unknown corruption"):
        parse_corruptions("jpeg,snow")


def test_a_corrupting_store_holds_the_corrupted_image_after_the_models_preprocessing(tmp_path):
    path = tmp_path / "a.png"
    textured(32).save(path)
    processor = ImageProcessor(size={"height": 16, "width": 16})
    corruption = Corruption("gaussian_noise", 4, seed=1)
    store = ImageStore([path], CorruptingProcessor(processor, corruption), progress=False)
    expected = processor.resize_to_array(corruption(path, str(path)))
    assert np.array_equal(store.pixels[0].numpy(), expected)
    assert not np.array_equal(expected, processor.resize_to_array(path))
    assert torch.equal(store.batch([0]), processor.normalize_batch(torch.from_numpy(expected.copy())[None]))


def test_multiple_choice_images_are_corrupted_too(tmp_path):
    path = tmp_path / "a.png"
    textured(32).save(path)
    item = MultipleChoiceRecord("q1", "<image 1> which?", ("a", "b"), "A", images=(path.read_bytes(),))
    split = corrupted_split(SplitData(name="x", multiple_choice=[item]), Corruption("contrast", 5))
    changed = Image.open(__import__("io").BytesIO(split.multiple_choice[0].images[0]))
    assert change(textured(32), changed.convert("RGB")) > 10
    assert split.multiple_choice[0].answer == "A"


# --- evaluate --corruptions on a table, with a model whose answer depends on brightness -------------------


class DarkOrBright(torch.nn.Module):
    """Answers "dark" where the image's mean raw value is under 0.25, else "bright"."""

    model_type = "dark_or_bright"

    def __init__(self):
        super().__init__()
        self.image_processor = ImageProcessor(size={"height": 8, "width": 8})

    def answer_batch(self, questions, pixels):
        raw = pixels.mean(dim=(1, 2, 3)) * 0.5 + 0.5
        return ["dark" if v < 0.25 else "bright" for v in raw.tolist()]


@pytest.fixture
def black_table(tmp_path) -> Path:
    for k in range(4):
        Image.new("RGB", (16, 16), (0, 0, 0)).save(tmp_path / f"b{k}.png")
    rows = [{"image": f"b{k}.png", "question": "is it dark or bright?", "answer": "dark"} for k in range(4)]
    table = tmp_path / "table.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def test_evaluate_with_corruptions_writes_the_table_figures_and_plot(black_table, tmp_path):
    from multimodal_models.data.splits import SplitFiles

    out = tmp_path / "report"
    results = evaluate_model(DarkOrBright(), SplitFiles(table=str(black_table)), out, progress=False,
                             corruptions=CORRUPTIONS)
    vqa = results["robustness"]["metrics"]["VQA accuracy"]
    assert vqa["clean"] == 100.0
    # brightness lifts black to grey 0.1 .. 0.5: "dark" holds up to 0.2; the others leave black dark
    assert vqa["corrupted"]["brightness"] == {"1": 100.0, "2": 100.0, "3": 0.0, "4": 0.0, "5": 0.0}
    for name in ("gaussian_noise", "gaussian_blur", "jpeg", "contrast", "pixelate"):
        assert set(vqa["corrupted"][name].values()) == {100.0}, name
    assert vqa["mean"]["brightness"] == 40.0 and vqa["relative"]["brightness"] == 0.4
    assert vqa["mean_relative"] == 0.9  # (25 + 2) / 30 runs at full accuracy
    assert vqa["mean_corrupted"] == 90.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["robustness"] == json.loads(json.dumps(results["robustness"]))
    report = (out / "report.md").read_text()
    assert "## Robustness to image corruptions" in report
    assert "| brightness | 100 | 100 | 0 | 0 | 0 | 40 | 0.4 |" in report
    assert "mean relative **0.9**" in report
    assert "![robustness.png](robustness.png)" in report
    assert Image.open(out / "robustness.png").size[0] > 100


def test_the_command_line_takes_corruptions_and_severities(black_table, tmp_path, monkeypatch, capsys):
    import multimodal_models.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: DarkOrBright())
    out = tmp_path / "cli"
    assert main(["evaluate", "--table", str(black_table), "--out", str(out), "--quiet",
                 "--corruptions", "brightness,contrast", "--severities", "2,3"]) == 0
    capsys.readouterr()
    robustness = json.loads((out / "metrics.json").read_text())["robustness"]
    assert robustness["corruptions"] == ["brightness", "contrast"] and robustness["severities"] == [2, 3]
    assert robustness["metrics"]["VQA accuracy"]["corrupted"] == {"brightness": {"2": 100.0, "3": 0.0},
                                                                  "contrast": {"2": 100.0, "3": 100.0}}
    assert main(["evaluate", "--table", str(black_table), "--out", str(out), "--corruptions", "snow"]) != 0
    assert "--corruptions: unknown corruption(s) snow; known: gaussian_noise, " in capsys.readouterr().err
    assert main(["evaluate", "--table", str(black_table), "--out", str(out), "--corruptions", "--severities", "0,6"]) != 0
    assert "--severities 0,6: give severities 1 to 5" in capsys.readouterr().err


# --- paraphrases ----------------------------------------------------------------------------------------


def test_paraphrases_of_each_form():
    p = paraphrases("what color is the large star?", "query_color")
    assert p.seen == ("what is the color of the large star?", "which color does the large star have?")
    assert "which colour does the large star have?" in p.new and "the large star is what color?" in p.new
    p = paraphrases("is the red circle to the left of the blue square?", "spatial")
    assert p.seen == ("is the blue square to the right of the red circle?",)
    p = paraphrases("are there more circles than red objects?", "compare_count")
    assert p.seen == ("are there fewer red objects than circles?",)
    p = paraphrases("is the orange star smaller than the orange hexagon?", "compare_size")
    assert p.seen == ("is the orange hexagon larger than the orange star?",)
    assert paraphrases("what is the man holding?", None) is None


def test_every_question_parses_and_its_seen_paraphrases_keep_the_answer(tiny_shapes):
    """The independent solver (tests/shapes_solver.py) answers every seen paraphrase as the original."""
    questions = json.loads((tiny_shapes / "vqa" / "shapes_test_questions.json").read_text())["questions"]
    annotations = {a["question_id"]: a for a in
                   json.loads((tiny_shapes / "vqa" / "shapes_test_annotations.json").read_text())["annotations"]}
    scenes = json.loads((tiny_shapes / "scenes" / "test_scenes.json").read_text())["scenes"]
    objects = {s["image_id"]: [{**o, "x": o["position"][0], "y": o["position"][1]} for o in s["objects"]] for s in scenes}
    checked = 0
    for q in questions:
        a = annotations[q["question_id"]]
        found = paraphrases(q["question"], a["question_type"])
        assert found is not None and found.new, q["question"]
        for seen in found.seen:
            assert solve(objects[q["image_id"]], seen) == a["multiple_choice_answer"], (q["question"], seen)
            checked += 1
    assert checked > len(questions) / 2


class Vocabulary:
    """A word tokenizer's unknown-word test: id 0 for a word outside the vocabulary."""

    unk_id = 0

    def __init__(self, words: set[str]):
        self.words = words

    def encode(self, text: str) -> list[int]:
        return [1 if w in self.words else 0 for w in text.replace("?", " ?").replace(".", " .").replace(",", " ,").split()]

    def knows(self, text: str) -> bool:
        return 0 not in self.encode(text)


class Echo(torch.nn.Module):
    """Answers a question the split asks with the gold answer of its first asking, any other with "no"."""

    model_type = "echo"

    def __init__(self, gold: dict[str, str]):
        super().__init__()
        self.gold = gold
        self.image_processor = ImageProcessor()

    def answer(self, question: str) -> str:
        return self.gold.get(question, "no")

    def answer_batch(self, questions, pixels):
        return [self.answer(q) for q in questions]


def test_paraphrase_robustness_counts_changed_answers_exactly(tiny_shapes, tmp_path):
    from multimodal_models.data.splits import DataConfig, load_split

    split = load_split(DataConfig(root=str(tiny_shapes), eval_split="test"), "eval")
    gold: dict[str, str] = {}
    for r in split.vqa:
        gold.setdefault(r.question, r.answer)
    model = Echo(gold)
    model.tokenizer = Vocabulary({w for q in gold for w in q.replace("?", " ?").split()})
    results = evaluate_model(model, tiny_shapes, tmp_path / "p", progress=False, extras=(ParaphraseRobustness(seed=5),))
    p = results["paraphrases"]
    assert p["unparsed"] == 0 and p["seed"] == 5

    def pct(flags) -> float:
        return round(100 * sum(flags) / len(flags), 2)

    for kind in ("seen", "new"):
        asked = [(r, pick(getattr(paraphrases(r.question, r.question_type), kind), f"{kind}:{r.question_id}", 5))
                 for r in split.vqa if getattr(paraphrases(r.question, r.question_type), kind)]
        assert p[kind]["num"] == len(asked)
        assert p[kind]["original_accuracy"] == pct([model.answer(r.question) == r.answer for r, _ in asked])
        assert p[kind]["paraphrase_accuracy"] == pct([model.answer(q) == r.answer for r, q in asked])
        assert p[kind]["changed"] == pct([model.answer(q) != model.answer(r.question) for r, q in asked])
        unknown = [not model.tokenizer.knows(q) for _, q in asked]
        assert p[kind]["unknown_words"] == pct(unknown)
        known = [(r, q) for r, q in asked if model.tokenizer.knows(q)]
        assert p[kind]["known_words"]["num"] == len(known)
        assert p[kind]["known_words"]["changed"] == (pct([model.answer(q) != model.answer(r.question) for r, q in known])
                                                     if known else None)
    assert p["new"]["unknown_words"] > 0  # "colour", "picture", ...
    assert p["new"]["num"] == len(split.vqa) and 0 < p["new"]["changed"] < 100
    x = p["new"]
    report = (tmp_path / "p" / "report.md").read_text()
    assert "## Question paraphrases (Shapes)" in report
    assert (f"| new | {x['num']} | {x['original_accuracy']} | {x['paraphrase_accuracy']} | {x['changed']}% | "
            f"{x['unknown_words']}% |" in report)
    assert f"| new, known words only | {x['known_words']['num']} |" in report
