"""The README's scoring and evaluation commands on benchmark files laid out as they are published.

MMMU (MMMU/MMMU on the Hugging Face hub) is one folder per subject, each holding
dev-00000-of-00001.parquet, validation-00000-of-00001.parquet and test-00000-of-00001.parquet
(test answers hidden as "?"); the fixture below writes that layout, with MMMU's columns, in
tmp_path. Three of its open questions store their accepted answers as a list literal, as the
real validation_Math_15, validation_Geography_4 and validation_Chemistry_30 do.

Expected MMMU numbers marked OFFICIAL were printed by the official evaluation code,
MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py @ aa9b70da (parse_multi_choice_response,
parse_open_response, evaluate, calculate_ins_level_acc), driven as mmmu/main_eval_only.py
@ bb0b95a drives it, with the ground truth as mmmu/answer_dict_val.json gives it (a JSON list for
the three questions above): per subject, evaluate(); overall, calculate_ins_level_acc; round 3.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from multimodal_models.cli import main
from multimodal_models.data.formats import read_mmmu
from multimodal_models.data.splits import load_split
from multimodal_models.evaluate.harness import evaluate_multiple_choice

FIXTURES = Path(__file__).parent / "fixtures" / "formats"

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MMMU_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("options", pa.string()), ("explanation", pa.string())]
    + [(f"image_{k}", _IMAGE) for k in range(1, 8)]
    + [(name, pa.string()) for name in ("img_type", "answer", "topic_difficulty", "question_type", "subfield")]
)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# (id, question_type, options, answer as stored in the parquet "answer" column, response)
VALIDATION = [
    ("validation_Art_1", "multiple-choice", ["Cubism", "Impressionism", "Baroque"], "B", "(B)"),
    ("validation_Art_2", "multiple-choice", ["Cubism", "Impressionism", "Baroque"], "A", "(C)"),
    ("validation_Chemistry_30", "open", [], "['$MgS$', 'MgS']", "The product is MgS"),
    ("validation_Geography_1", "multiple-choice", ["Lake", "River", "Glacier"], "C", "(C)"),
    ("validation_Geography_4", "open", [], "['Tampa', 'Florida']", "The city is Tampa."),
    ("validation_Math_15", "open", [], "['24/7', '3.429']", "The answer is 3.429"),
    ("validation_Math_2", "open", [], "12", "x = 12"),
]
DEV = [
    ("dev_Art_1", "multiple-choice", ["Fresco", "Tempera", "Oil"], "C", "(C)"),
    ("dev_Chemistry_1", "open", [], "7", "The pH is 7"),
    ("dev_Geography_1", "multiple-choice", ["North", "South"], "A", "(B)"),
    ("dev_Math_1", "open", [], "5", "x = 5"),
]
TEST = [  # MMMU's test answers are not published: every one is "?"
    (f"test_{subject}_1", "multiple-choice", ["One", "Two"], "?", "(A)")
    for subject in ("Art", "Chemistry", "Geography", "Math")
]


def write_split(folder: Path, split: str, rows: list[tuple]) -> None:
    """Each subject's rows as <folder>/<Subject>/<split>-00000-of-00001.parquet, MMMU's columns."""
    by_subject: dict[str, list[tuple]] = {}
    for row in rows:
        by_subject.setdefault("_".join(row[0].split("_")[1:-1]), []).append(row)
    for subject, subject_rows in by_subject.items():
        columns: dict[str, list] = {name: [] for name in MMMU_SCHEMA.names}
        for record_id, question_type, options, answer, _ in subject_rows:
            values = {"id": record_id, "question": "<image 1> What is shown?", "options": repr(options),
                      "explanation": "", "image_1": {"bytes": png(), "path": None}, "img_type": "['Diagrams']",
                      "answer": answer, "topic_difficulty": "Medium", "question_type": question_type,
                      "subfield": "General"}
            for name in MMMU_SCHEMA.names:
                columns[name].append(values.get(name))
        (folder / subject).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns, schema=MMMU_SCHEMA), folder / subject / f"{split}-00000-of-00001.parquet")


@pytest.fixture(scope="module")
def mmmu(tmp_path_factory) -> Path:
    """MMMU/ as downloaded from the hub: four subject folders, three split files in each."""
    root = tmp_path_factory.mktemp("published") / "MMMU"
    for split, rows in (("dev", DEV), ("validation", VALIDATION), ("test", TEST)):
        write_split(root, split, rows)
    return root


def responses_file(folder: Path, name: str, rows: list[tuple], *, drop: tuple[str, ...] = ()) -> Path:
    path = folder / name
    path.write_text(json.dumps({row[0]: row[4] for row in rows if row[0] not in drop}))
    return path


def score(capsys, *arguments: str) -> dict:
    assert main(["score", "mmmu", *arguments]) == 0
    return json.loads(capsys.readouterr().out)


def test_layout_of_the_fixture_is_the_published_one(mmmu):
    assert sorted(str(p.relative_to(mmmu)) for p in mmmu.rglob("*.parquet")) == [
        f"{subject}/{split}-00000-of-00001.parquet"
        for subject in ("Art", "Chemistry", "Geography", "Math") for split in ("dev", "test", "validation")
    ]


def test_score_mmmu_on_a_subject_folder_reads_its_validation_split(mmmu, tmp_path, capsys):
    # The README's command: before --split, this read dev, validation and test and stopped.
    predictions = responses_file(tmp_path, "art.json", [r for r in VALIDATION if "_Art_" in r[0]])
    scores = score(capsys, "--predictions", str(predictions), "--data", str(mmmu / "Art"))
    assert scores["overall"] == {"acc": 0.5, "num": 2}  # OFFICIAL
    assert scores["split"] == "validation" and scores["missing"] == 0
    assert scores["correct"] == {"validation_Art_1": True, "validation_Art_2": False}


def test_score_mmmu_on_the_top_folder_with_answer_lists(mmmu, tmp_path, capsys):
    predictions = responses_file(tmp_path, "all.json", VALIDATION)
    scores = score(capsys, "--predictions", str(predictions), "--data", str(mmmu) + "/")
    assert scores["overall"] == {"acc": 0.857, "num": 7}  # OFFICIAL (0.429 with each list taken as one string)
    assert scores["perSubject"] == {  # OFFICIAL
        "Art": {"acc": 0.5, "num": 2},
        "Chemistry": {"acc": 1.0, "num": 1},
        "Geography": {"acc": 1.0, "num": 2},
        "Math": {"acc": 1.0, "num": 2},
    }
    assert scores["perDomain"] == {"Art and Design": {"acc": 0.5, "num": 2}, "Science": {"acc": 1.0, "num": 5}}
    # each list answer is matched by one of its entries: Tampa (the first), MgS and 3.429 (the second)
    assert all(scores["correct"][i] for i in ("validation_Math_15", "validation_Geography_4", "validation_Chemistry_30"))


def test_score_mmmu_split_option(mmmu, tmp_path, capsys):
    dev = responses_file(tmp_path, "dev.json", DEV)
    scores = score(capsys, "--predictions", str(dev), "--data", str(mmmu), "--split", "dev")
    assert scores["overall"] == {"acc": 0.75, "num": 4} and scores["split"] == "dev"

    hidden = responses_file(tmp_path, "test.json", TEST)
    assert main(["score", "mmmu", "--predictions", str(hidden), "--data", str(mmmu), "--split", "test"]) == 2
    assert ("4 record(s) have no published answer ('?'): 'test_Art_1', 'test_Chemistry_1', 'test_Geography_1', "
            "'test_Math_1'; MMMU's test answers are hidden") in capsys.readouterr().err

    assert main(["score", "mmmu", "--predictions", str(dev), "--data", str(mmmu), "--split", "val"]) == 2
    assert (f"{mmmu}: no parquet files of split 'val' in this folder or below it (MMMU's layout: "
            "<Subject>/<split>-00000-of-00001.parquet); the files here are of split(s) dev, test, validation"
            in capsys.readouterr().err)


def test_score_mmmu_missing_responses_are_an_error_unless_allowed(mmmu, tmp_path, capsys):
    partial = responses_file(tmp_path, "partial.json", VALIDATION, drop=("validation_Math_2", "validation_Art_2"))
    assert main(["score", "mmmu", "--predictions", str(partial), "--data", str(mmmu)]) == 2
    assert (f"{partial}: no response for 2 of the 7 record(s) of {mmmu} (split 'validation'): 'validation_Art_2', "
            "'validation_Math_2'; pass --allow-missing") in capsys.readouterr().err

    scores = score(capsys, "--predictions", str(partial), "--data", str(mmmu), "--allow-missing")
    assert scores["overall"] == {"acc": 1.0, "num": 5} and scores["missing"] == 2


def test_score_mmmu_on_one_file_reads_that_file(mmmu, tmp_path, capsys):
    predictions = responses_file(tmp_path, "math.json", [r for r in DEV if "_Math_" in r[0]])
    scores = score(capsys, "--predictions", str(predictions), "--data", str(mmmu / "Math" / "dev-00000-of-00001.parquet"))
    assert scores["overall"] == {"acc": 1.0, "num": 1} and scores["split"] is None


class _Stop(Exception):
    """Raised by the stand-in for evaluate_model: the data it was given is all these tests need."""


@pytest.fixture
def evaluated_data(monkeypatch):
    """What `multimodal evaluate` would evaluate: the DataConfig it passes to evaluate_model."""
    seen = {}

    def fake_evaluate_model(model, data, out, **options):
        seen["data"] = data
        raise _Stop

    monkeypatch.setattr("multimodal_models.evaluate.report.evaluate_model", fake_evaluate_model)
    monkeypatch.setattr("multimodal_models.cli._load", lambda name, args, expected=None, **options: None)
    return seen


def test_evaluate_mmmu_folder_reads_the_validation_split(mmmu, tmp_path, evaluated_data):
    for folder, expected in ((mmmu / "Art", ["validation_Art_1", "validation_Art_2"]),
                             (mmmu, [r[0] for r in VALIDATION])):
        with pytest.raises(_Stop):
            main(["evaluate", "--model", "any", "--mmmu", str(folder), "--out", str(tmp_path / "report")])
        records = load_split(evaluated_data["data"], "eval").multiple_choice
        assert [r.id for r in records] == expected


def test_evaluate_mmmu_split_picks_a_folder_split(mmmu, tmp_path, evaluated_data):
    with pytest.raises(_Stop):
        main(["evaluate", "--model", "any", "--mmmu", str(mmmu), "--mmmu-split", "dev", "--out", str(tmp_path / "r")])
    records = load_split(evaluated_data["data"], "eval").multiple_choice
    assert [r.id for r in records] == [r[0] for r in DEV]
    assert main(["evaluate", "--model", "any", "--mmmu-split", "dev", "--out", str(tmp_path / "r")]) == 2


def test_evaluate_karpathy_file_defaults_to_its_test_split(tmp_path, evaluated_data):
    karpathy = FIXTURES / "karpathy" / "dataset_coco.json"
    splits = {image["split"] for image in json.loads(karpathy.read_text())["images"]}
    assert {"train", "test"} <= splits  # the file holds several splits, as Karpathy's does
    with pytest.raises(_Stop):
        main(["evaluate", "--model", "any", "--karpathy", str(karpathy), "--out", str(tmp_path / "r")])
    data = evaluated_data["data"]
    assert data.eval.karpathy_split == "test"
    captions = load_split(data, "eval").captions
    test_ids = {image.get("cocoid", image["imgid"]) for image in json.loads(karpathy.read_text())["images"]
                if image["split"] == "test"}
    assert {r.image_id for r in captions} == test_ids


def test_score_vqa_on_the_published_file_names(capsys):
    # The README's command on files named as VQA v2 publishes them. 262148000 "down" (8 of 10 humans)
    # and 262148001 "watching" (8 of 10) score 100; 393225000 "yes" (1 of 10) scores 0.3: one
    # matching human among the 9 left after dropping each annotator in turn, except the one who
    # said it (9/10 · 1/3).
    vqa = FIXTURES / "vqa"
    assert main(["score", "vqa", "--predictions", str(vqa / "vqa_results.json"),
                 "--questions", str(vqa / "v2_OpenEnded_mscoco_val2014_questions.json"),
                 "--annotations", str(vqa / "v2_mscoco_val2014_annotations.json")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["overall"] == 76.67 and scores["perAnswerType"] == {"other": 100.0, "yes/no": 30.0}
    assert scores["num_questions"] == 3


def test_evaluating_hidden_test_answers_is_refused_before_the_model_runs(mmmu):
    class NeverAsked:
        def chat(self, *args, **kwargs):
            raise AssertionError("the model was run on questions that cannot be scored")

    records = read_mmmu(mmmu / "Art" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"1 record\(s\) have no published answer \('\?'\): 'test_Art_1'"):
        evaluate_multiple_choice(NeverAsked(), records)
