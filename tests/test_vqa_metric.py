"""VQA v2 accuracy against the official evaluation code.

Provenance of the expected numbers
----------------------------------
Every number marked OFFICIAL below was printed by the official code, unmodified, run with
Python 2.7.18 (the language it is written in) on the fixture files in tests/fixtures/vqa/:

  GT-Vision-Lab/VQA  PythonEvaluationTools/vqaEvaluation/vqaEval.py  @ a013f0043c1e2cdc995922dfe257f7149aa9af06
  GT-Vision-Lab/VQA  PythonHelperTools/vqaTools/vqa.py               @ 5e7e7dfbbebae7f329c798c966d9b3c9b61e8cf6

with the calls of PythonEvaluationTools/vqaEvalDemo.py:

  vqa = VQA(annotations_json, questions_json)
  vqaRes = vqa.loadRes(results_json, questions_json)
  vqaEval = VQAEval(vqa, vqaRes, n=2)          # n=1 and n=3 for the precision test
  vqaEval.evaluate()
  -> vqaEval.accuracy (overall / perAnswerType / perQuestionType) and vqaEval.evalQA

The normalisation table comes from the same VQAEval object:
processDigitArticle(processPunctuation(s)) for each input string s.
The official code is not part of this repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multimodal_models.data.records import VQARecord
from multimodal_models.evaluate.metrics.vqa import (
    normalize_answer,
    process_punctuation,
    results_to_predictions,
    round_half_away,
    single_question_accuracy,
    vqa_accuracy,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vqa"
QUESTIONS = FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = FIXTURES / "v2_mscoco_val2014_annotations.json"
RESULTS = FIXTURES / "v2_OpenEnded_mscoco_val2014_fake_results.json"


def load_fixture_records() -> list[VQARecord]:
    """Tiny local reader (the general one lives in multimodal_models.data.formats)."""
    questions = {q["question_id"]: q for q in json.loads(QUESTIONS.read_text())["questions"]}
    records = []
    for ann in json.loads(ANNOTATIONS.read_text())["annotations"]:
        q = questions[ann["question_id"]]
        records.append(
            VQARecord(
                question_id=ann["question_id"],
                image_id=ann["image_id"],
                image=Path(f"COCO_val2014_{ann['image_id']:012d}.jpg"),
                question=q["question"],
                answers=tuple(a["answer"] for a in ann["answers"]),
                answer=ann["multiple_choice_answer"],
                answer_type=ann["answer_type"],
                question_type=ann["question_type"],
            )
        )
    return records


@pytest.fixture(scope="module")
def records() -> list[VQARecord]:
    return load_fixture_records()


@pytest.fixture(scope="module")
def predictions() -> dict:
    return results_to_predictions(json.loads(RESULTS.read_text()))


# OFFICIAL: vqaEval.evalQA, n=2 (question_id -> accuracy in percent).
OFFICIAL_EVAL_QA = {
    100000000: 100.0, 100007001: 0.0, 100014002: 0.0, 100021000: 100.0, 100028001: 90.0,
    100035002: 60.0, 100042000: 0.0, 100049001: 100.0, 100056002: 100.0, 100063000: 60.0,
    100070001: 30.0, 100077002: 0.0, 100084000: 100.0, 100091001: 100.0, 100098002: 100.0,
    100105000: 100.0, 100112001: 0.0, 100119002: 100.0, 100126000: 100.0, 100133001: 0.0,
    100140002: 100.0, 100147000: 0.0, 100154001: 100.0, 100161002: 90.0, 100168000: 100.0,
    100175001: 90.0, 100182002: 100.0, 100189000: 0.0, 100196001: 100.0, 100203002: 100.0,
    100210000: 90.0, 100217001: 100.0, 100224002: 100.0, 100231000: 100.0,
}

# OFFICIAL: vqaEval.accuracy["perQuestionType"], n=2.
OFFICIAL_PER_QUESTION_TYPE = {
    "are there": 60.0, "how many": 65.56, "is it": 45.0, "is the": 0.0, "is there": 95.0,
    "is this": 100.0, "what animal is": 50.0, "what brand": 100.0, "what color is the": 0.0,
    "what colors are": 90.0, "what does the": 100.0, "what is": 100.0, "what is in the": 100.0,
    "what is the": 100.0, "what is the man": 50.0, "what number is": 100.0, "what time": 100.0,
    "where is the": 100.0, "which": 100.0, "whose": 90.0,
}


def test_fixture_matches_official_script(records, predictions):
    result = vqa_accuracy(predictions, records)
    assert result["overall"] == 70.88  # OFFICIAL
    assert result["perAnswerType"] == {"number": 69.0, "other": 79.38, "yes/no": 56.25}  # OFFICIAL
    assert result["perQuestionType"] == OFFICIAL_PER_QUESTION_TYPE
    assert result["perQuestion"] == OFFICIAL_EVAL_QA
    assert result["num_questions"] == 34


def test_precision_matches_official_script(records, predictions):
    # OFFICIAL, n=1. 56.25 -> 56.3 is Python 2 rounding (Python 3's round gives 56.2).
    one = vqa_accuracy(predictions, records, precision=1)
    assert one["overall"] == 70.9
    assert one["perAnswerType"] == {"number": 69.0, "other": 79.4, "yes/no": 56.3}
    assert one["perQuestionType"]["how many"] == 65.6
    # OFFICIAL, n=3.
    three = vqa_accuracy(predictions, records, precision=3)
    assert three["overall"] == 70.882
    assert three["perAnswerType"] == {"number": 69.0, "other": 79.375, "yes/no": 56.25}
    assert three["perQuestionType"]["how many"] == 65.556


def test_round_half_away_is_python2_round():
    # Python 2.7.18: round(0.125, 2) == 0.13, round(2.675, 2) == 2.67 (binary value below the tie).
    assert round_half_away(0.125, 2) == 0.13
    assert round_half_away(56.25, 1) == 56.3
    assert round_half_away(2.675, 2) == 2.67
    assert round_half_away(100.0, 2) == 100.0


# OFFICIAL: (input, processDigitArticle(processPunctuation(input)), processPunctuation(input)).
OFFICIAL_NORMALISATION = [
    ("yes.", "yes", "yes"),
    ("Yes", "yes", "Yes"),
    ("no!", "no", "no "),
    ("t-shirt", "t shirt", "t shirt"),
    ("t - shirt", "t shirt", "t  shirt"),
    ("10,000", "10000", "10000"),
    ("1,000-2,000", "10002000", "10002000"),  # a digit,digit anywhere deletes ALL punctuation
    ("3,5 and 4-5", "35 and 45", "35 and 45"),
    ("2.5", "2.5", "2.5"),
    ("2.50", "2.50", "2.50"),
    ("5.", "5", "5"),
    (".5", ".5", ".5"),
    ("it's", "it's", "it's"),
    ("dont", "don't", "dont"),
    ("isnt", "isn't", "isnt"),
    ("Im", "im", "Im"),  # capitalised contraction keys never fire
    ("somebody'd", "somebodyd", "somebody'd"),
    ("a dog", "dog", "a dog"),
    ("A", "", "A"),
    ("none", "0", "none"),
    ("None of them", "0 of them", "None of them"),
    ("eleven", "eleven", "eleven"),
    ("twenty-two", "twenty 2", "twenty two"),
    ("st. louis", "st louis", "st louis"),
    ("u.s.a.", "usa", "usa"),
    ("2:50 pm", "2:50 pm", "2:50 pm"),
    ("red, white", "red white", "red white"),
    ("left / right", "left right", "left  right"),
    ("a/b/c", "b c", "a b c"),
    ("(yes)", "yes", " yes "),
    ("<none>", "0", " none "),
    ("e-mail@host.com", "e mail hostcom", "e mail hostcom"),
    ("fire  hydrant", "fire hydrant", "fire  hydrant"),
    ("...", "", ""),
    (". . .", "", "  "),
    # only the first 32 periods go (upstream passes re.UNICODE == 32 as sub's count)
    (
        "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z.A.B.C.D.E.F.G.H",
        "abcdefghijklmnopqrstuvwxyzabcdefg.h",
        "abcdefghijklmnopqrstuvwxyzABCDEFG.H",
    ),
    ("\u0662,\u0663", "\u0662 \u0663", "\u0662 \u0663"),  # Arabic-Indic digits are not digits in Python 2 regexes
    ("One Two Three", "1 2 3", "One Two Three"),
    ("dont, isnt", "don't isn't", "dont isnt"),
    ("y'allll", "y'all'll", "y'allll"),
    ("", "", ""),
]


@pytest.mark.parametrize("text,normalised,punctuation_only", OFFICIAL_NORMALISATION)
def test_normalisation_matches_official(text, normalised, punctuation_only):
    assert process_punctuation(text) == punctuation_only
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize(
    "matching,expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_accuracy(matching, expected):
    humans = ["cat"] * matching + ["dog"] * (10 - matching)
    assert single_question_accuracy("cat", humans) == pytest.approx(expected)


def test_unanimous_humans_are_compared_verbatim():
    # Humans agree -> no normalisation at all: case, punctuation, number words, articles all count.
    assert single_question_accuracy("yes", ["yes"] * 10) == 1.0
    assert single_question_accuracy("Yes", ["yes"] * 10) == 0.0
    assert single_question_accuracy("no.", ["no"] * 10) == 0.0
    assert single_question_accuracy("2", ["two"] * 10) == 0.0
    assert single_question_accuracy("a dog", ["dog"] * 10) == 0.0
    # ...but whitespace is always cleaned, before the agreement test.
    assert single_question_accuracy("  yes\n", ["yes"] * 10) == 1.0
    assert single_question_accuracy("Yes", ["yes"] * 9 + ["yes "]) == 0.0
    # One disagreeing human switches normalisation on for everybody.
    assert single_question_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0
    assert single_question_accuracy("2", ["two"] * 9 + ["3"]) == 1.0


def test_records_may_be_a_mapping(records, predictions):
    by_id = {r.question_id: r for r in records}
    assert vqa_accuracy(predictions, by_id)["overall"] == 70.88


def test_missing_prediction_is_an_error_naming_the_ids(records, predictions):
    # Upstream: loadRes asserts set(result ids) == set(annotation ids) (AssertionError
    # "Results do not correspond to current VQA set ..."). Here the message names the ids.
    partial = dict(predictions)
    del partial[100231000]
    del partial[100000000]
    with pytest.raises(ValueError, match=r"no prediction for 2 annotated question\(s\): 100000000, 100231000"):
        vqa_accuracy(partial, records)


def test_require_all_false_scores_only_predicted_questions(records, predictions):
    subset = {qid: predictions[qid] for qid in (100000000, 100007001, 100028001)}
    result = vqa_accuracy(subset, records, require_all=False)
    assert result["num_questions"] == 3
    assert result["perQuestion"] == {100000000: 100.0, 100007001: 0.0, 100028001: 90.0}
    assert result["overall"] == round_half_away(100 * (1.0 + 0.0 + 0.9) / 3, 2) == 63.33
    assert result["perAnswerType"] == {"yes/no": 63.33}
    assert result["perQuestionType"] == {"is this": 100.0, "is the": 0.0, "is there": 90.0}


def test_unknown_question_id_is_an_error(records, predictions):
    extra = dict(predictions)
    extra[999] = "yes"
    with pytest.raises(ValueError, match=r"not in the annotations: 999"):
        vqa_accuracy(extra, records)
    with pytest.raises(ValueError, match=r"not in the annotations: 999"):
        vqa_accuracy({999: "yes"}, records, require_all=False)


def test_string_ids_get_a_hint(records, predictions):
    as_strings = {str(qid): answer for qid, answer in predictions.items()}
    with pytest.raises(ValueError, match="compared with their type"):
        vqa_accuracy(as_strings, records)


def test_bad_inputs_are_clear_errors(records, predictions):
    bad = dict(predictions)
    bad[100000000] = 3
    with pytest.raises(ValueError, match=r"question_id 100000000 is int, expected a string"):
        vqa_accuracy(bad, records)
    unanswered = [VQARecord(question_id=1, image_id=1, image=Path("x.jpg"), question="q?")]
    with pytest.raises(ValueError, match="no human answers"):
        vqa_accuracy({1: "yes"}, unanswered)
    with pytest.raises(ValueError, match="appears twice"):
        vqa_accuracy(predictions, records + records[:1])
    with pytest.raises(ValueError, match="already has an answer"):
        results_to_predictions([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}])
    with pytest.raises(ValueError, match="'question_id' and 'answer'"):
        results_to_predictions([{"question_id": 1}])


def test_fixture_is_in_the_published_layout():
    questions = json.loads(QUESTIONS.read_text())
    annotations = json.loads(ANNOTATIONS.read_text())
    assert set(questions) == {"info", "task_type", "data_type", "data_subtype", "license", "questions"}
    assert set(annotations) == {"info", "data_type", "data_subtype", "license", "annotations"}
    for q in questions["questions"]:
        assert set(q) == {"image_id", "question", "question_id"}
    for ann in annotations["annotations"]:
        assert set(ann) == {
            "question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id",
        }
        assert len(ann["answers"]) == 10
        assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in ann["answers"])


def test_a_single_reference_answer_scores_normalised_exact_match():
    """Datasets with one answer per question (a plain JSONL) are not scored 0 by leave-one-out."""
    assert single_question_accuracy("Two.", ["2"]) == 1.0
    assert single_question_accuracy("three", ["2"]) == 0.0
