"""MMMU answer extraction and scoring against the official evaluation code.

Provenance of the expected numbers
----------------------------------
Values marked OFFICIAL were printed by the official MMMU code (MMMU-Benchmark/MMMU), run
with Python 3.11 on the fixture in tests/fixtures/mmmu/ (four subjects in the Hugging Face
layout <Subject>/validation-00000-of-00001.parquet, raw responses in responses.json):

  eval/eval_utils.py  @ bb91f232fa7a7900395b264f69f57914f0c68ee1  (parse_multi_choice_response,
                         parse_open_response, evaluate; seeds `random` with 42 at import)
  eval/data_utils.py  @ 0b043a87924d2d6d955f4df91e53cbd68e7ba902  (CAT_SHORT2LONG, DOMAIN_CAT2SUB_CAT,
                         get_multi_choice_info)

driven the way the official pipeline runs:
  1. as mmmu/run_llava.py @ aa9b70da: random.seed(42); subjects concatenated in
     CAT_SHORT2LONG order; multiple-choice responses -> parse_multi_choice_response(response,
     all_choices, index2ans) with get_multi_choice_info(literal_eval(options)); open responses kept raw;
  2. as eval/main_eval_only.py @ bf380a22: group by the id's category, parse_open_response on
     open answers, evaluate() per category, calculate_ins_level_acc (eval/print_results.py
     @ 44b45b50), round(acc, 3); ground truth = the parquet "answer" column.
The official code is not part of this repository.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from multimodal_models.data.records import MultipleChoiceRecord
from multimodal_models.errors import DataFormatError
from multimodal_models.evaluate.metrics.mmmu import (
    extract_choice,
    extract_open_answers,
    gold_answers,
    mmmu_scores,
    open_answer_correct,
    read_mmmu_predictions,
)

FIXTURES = Path(__file__).parent / "fixtures" / "mmmu"


def load_fixture_records() -> list[MultipleChoiceRecord]:
    """Tiny local reader of MMMU parquet files (the general one lives in multimodal_models.data.formats)."""
    records = []
    for parquet in sorted(FIXTURES.glob("*/validation-*.parquet")):
        for row in pq.read_table(parquet).to_pylist():
            images = tuple(row[f"image_{k}"]["bytes"] for k in range(1, 8) if row[f"image_{k}"] is not None)
            records.append(
                MultipleChoiceRecord(
                    id=row["id"],
                    question=row["question"],
                    options=tuple(ast.literal_eval(row["options"])),
                    answer=row["answer"],
                    images=images,
                    subject=parquet.parent.name,
                    subfield=row["subfield"],
                    question_type=row["question_type"],
                )
            )
    return records


@pytest.fixture(scope="module")
def records() -> list[MultipleChoiceRecord]:
    return load_fixture_records()


@pytest.fixture(scope="module")
def responses() -> dict[str, str]:
    return read_mmmu_predictions(FIXTURES / "responses.json")


# OFFICIAL: parsed multiple-choice predictions (step 1).
OFFICIAL_MC = {
    "validation_Accounting_1": "B",  # "B"
    "validation_Accounting_2": "C",  # "(C)"
    "validation_Accounting_3": "D",  # "(A) ... (D)": the last bracketed letter
    "validation_Accounting_4": "A",  # "A. $6,000": no candidate -> 1st random draw
    "validation_Accounting_5": "B",  # "The answer is (B) because ..."
    "validation_Art_1": "B",  # option text "impressionism" in a long response
    "validation_Art_2": "D",  # "Baroque ... Surrealism": the option text found last
    "validation_Art_3": "A",  # "I am not sure": 2nd random draw (5 options)
    "validation_Art_4": "C",  # "b": letters are case-sensitive -> 3rd random draw
    "validation_Art_5": "B",  # "The answer is A and not B.": last standalone letter
    "validation_Math_1": "D",  # "Answer: (D)"
}

# OFFICIAL: parse_open_response output (compared as sets: upstream returns set order).
OFFICIAL_OPEN = {
    "validation_Electronics_1": {"0.50 a", 0.5},
    "validation_Electronics_2": {"-4.2 v", -4.2},
    "validation_Electronics_3": {"they are connected in series"},
    "validation_Electronics_4": {1.5},
    "validation_Math_2": {3.14},
    "validation_Math_3": {"1200 units", 1200.0},
    "validation_Math_4": {12.0},
    "validation_Math_5": {8.0},
}

# OFFICIAL: judge_dict of evaluate().
OFFICIAL_WRONG = {"validation_Art_4", "validation_Art_5", "validation_Electronics_4", "validation_Math_5"}


def test_fixture_matches_official_scripts(records, responses):
    scores = mmmu_scores(responses, records)
    assert scores["overall"] == {"acc": 0.789, "num": 19}  # OFFICIAL "Overall"
    assert scores["perSubject"] == {  # OFFICIAL per-category rows
        "Accounting": {"acc": 1.0, "num": 5},
        "Art": {"acc": 0.6, "num": 5},
        "Electronics": {"acc": 0.75, "num": 4},
        "Math": {"acc": 0.8, "num": 5},
    }
    assert scores["perDomain"] == {  # OFFICIAL "Overall-<domain>" rows (those with questions)
        "Art and Design": {"acc": 0.6, "num": 5},
        "Business": {"acc": 1.0, "num": 5},
        "Science": {"acc": 0.8, "num": 5},
        "Tech and Engineering": {"acc": 0.75, "num": 4},
    }
    mc = {k: v for k, v in scores["predictions"].items() if isinstance(v, str)}
    assert mc == OFFICIAL_MC
    open_ = {k: set(v) for k, v in scores["predictions"].items() if isinstance(v, list)}
    assert open_ == OFFICIAL_OPEN
    assert {k for k, ok in scores["correct"].items() if not ok} == OFFICIAL_WRONG


def test_per_subfield(records, responses):
    # Not reported upstream; derived from the OFFICIAL judgements above and the parquet subfields.
    assert mmmu_scores(responses, records)["perSubfield"] == {
        "Financial Accounting": {"acc": 1.0, "num": 2},
        "Managerial Accounting": {"acc": 1.0, "num": 2},
        "Investment": {"acc": 1.0, "num": 1},
        "Fine Arts": {"acc": 1.0, "num": 2},
        "Sculpture": {"acc": 0.5, "num": 2},
        "Art History": {"acc": 0.0, "num": 1},
        "Analog electronics": {"acc": 1.0, "num": 2},
        "Circuits": {"acc": 0.5, "num": 2},
        "Calculus": {"acc": 1.0, "num": 1},
        "Geometry": {"acc": 1.0, "num": 1},
        "Statistics": {"acc": 1.0, "num": 1},
        "Algebra": {"acc": 0.5, "num": 2},
    }


def test_random_fallback_follows_the_official_seed():
    # Three fallbacks in official order (4, 5 and 3 options) after random.seed(42): A, A, C (OFFICIAL).
    rng = random.Random(42)
    assert extract_choice("A. $6,000", ["$6,000", "$7,500", "$9,000", "$10,500"], rng) == "A"
    assert extract_choice("I am not sure", ["Rodin", "Bernini", "Donatello", "Canova", "Michelangelo"], rng) == "A"
    assert extract_choice("b", ["Marble", "Bronze", "Wood"], rng) == "C"


def test_draws_follow_subject_order(records, responses):
    # Subjects are processed alphabetically whatever the input order (Accounting's fallback
    # always gets the first draw); within a subject the given order is kept.
    reversed_scores = mmmu_scores(responses, list(reversed(records)))["predictions"]
    assert reversed_scores["validation_Accounting_4"] == "A"


def test_seed_only_affects_fallbacks(records, responses):
    other = mmmu_scores(responses, records, seed=7)["predictions"]
    base = mmmu_scores(responses, records)["predictions"]
    fallbacks = {"validation_Accounting_4", "validation_Art_3", "validation_Art_4"}
    assert {k: v for k, v in other.items() if k not in fallbacks} == {
        k: v for k, v in base.items() if k not in fallbacks
    }


@pytest.mark.parametrize(
    "response,expected",
    [
        ("C", "C"),
        ("(B)", "B"),
        ("The answer is (B).", "B"),
        ("(A) or (C)? I pick (C)", "C"),  # last occurrence of the brackets
        ("(C) is better than (A), so (A) it is not... final: (C)", "C"),
        ("Between A and D I choose D", "D"),
        ("I would go with the last one, that is 10 percent", "D"),  # option text, > 5 tokens
        # "5 percent" is inside "7.5 percent" and its last occurrence starts later: B wins
        ("I would go with the third one, that is 7.5 percent", "B"),
        ("7.5 percent", None),  # option text ignored in short responses -> random
        ("B. 5%", None),  # "B." is not a recognised form -> random
    ],
)
def test_extract_choice(response, expected):
    # Expected letters are what the OFFICIAL parse_multi_choice_response returns (random.seed(0) for the fallbacks).
    options = ["2.5 percent", "5 percent", "7.5 percent", "10 percent"]
    rng = random.Random(0)
    got = extract_choice(response, options, rng)
    if expected is None:
        assert got == random.Random(0).choice(["A", "B", "C", "D"])
    else:
        assert got == expected


def test_extract_open_answers():
    # Expected sets are the OFFICIAL parse_open_response outputs for the same strings.
    assert set(extract_open_answers("The answer is 42.")) == {42.0}
    assert set(extract_open_answers("x = 12.004")) == {12.0}  # rounded to 2 decimals
    # the plain-number pattern also picks the last group of "1,234,567"
    assert set(extract_open_answers("Total: 1,234,567 dollars")) == {"total: 1,234,567 dollars", 567.0, 1234567.0}
    # 1.5e-3 rounds to 0.0; the plain pattern adds "1" and "-3"
    assert set(extract_open_answers("so the rate is 1.5e-3")) == {0.0, 1.0, -3.0}
    assert extract_open_answers("Paris") == ["paris"]
    assert extract_open_answers("b") == [" b", "b "]
    # sentences are NOT split (upstream lower-cases before its sentence regex): only lines are
    assert set(extract_open_answers("It is red. So it is blue")) == {"blue"}
    assert set(extract_open_answers("It is red\nSo it is blue")) == {"red", "blue"}


def test_open_answer_rule():
    # Same verdicts as the OFFICIAL eval_open.
    assert open_answer_correct("1,200", [1200.0])
    assert open_answer_correct("series", ["they are connected in series"])
    assert not open_answer_correct("3/2", [1.5])  # no fraction arithmetic
    assert not open_answer_correct("7", ["7 apples"])  # numeric gold needs a numeric prediction
    assert open_answer_correct("12", [12.0])


@pytest.mark.parametrize(
    "gold,response,correct",
    [  # OFFICIAL: eval_open(gold, parse_open_response(response)), mmmu/utils/eval_utils.py @ aa9b70da
        (["24/7", "3.429"], "The answer is 3.429", True),
        (["24/7", "3.429"], "24/7", True),
        (["24/7", "3.429"], "It is about 3.43.", True),
        (["24/7", "3.429"], "The ratio is 24/8", False),
        (["Tampa", "Florida"], "The city is Tampa.", True),
        (["Tampa", "Florida"], "It is in Florida", True),
        (["Tampa", "Florida"], "Orlando", False),
        (["$MgS$", "MgS"], "The product is MgS", True),
        (["$MgS$", "MgS"], "MgO", False),
        ("['24/7', '3.429']", "The answer is 3.429", False),  # the parquet string taken as one answer
        ("['Tampa', 'Florida']", "Tampa", False),
    ],
)
def test_open_answer_with_a_list_of_accepted_answers(gold, response, correct):
    assert open_answer_correct(gold, extract_open_answers(response)) is correct


def test_gold_answers_reads_the_list_literals_mmmu_stores():
    assert gold_answers("['24/7', '3.429']") == ["24/7", "3.429"]  # as validation_Math_15 stores it
    assert gold_answers("['$MgS$', 'MgS']") == ["$MgS$", "MgS"]
    assert gold_answers("B") == ["B"] and gold_answers("1,200") == ["1,200"]
    assert gold_answers("[1, 2]") == ["[1, 2]"]  # not a list of strings: the text is the answer
    assert gold_answers("[a, b") == ["[a, b"] and gold_answers("[]") == ["[]"]


def test_records_with_answer_lists_are_scored_against_any_of_them():
    records = [
        MultipleChoiceRecord("validation_Math_15", "<image 1> Ratio?", (), "['24/7', '3.429']", question_type="open"),
        MultipleChoiceRecord("validation_Geography_4", "<image 1> City?", (), "['Tampa', 'Florida']",
                             question_type="open"),
        MultipleChoiceRecord("validation_Art_1", "<image 1> Style?", ("x", "y", "z"), "['A', 'C']"),
    ]
    responses = {"validation_Math_15": "24/7", "validation_Geography_4": "Florida", "validation_Art_1": "(C)"}
    scores = mmmu_scores(responses, records)
    assert scores["correct"] == {"validation_Art_1": True, "validation_Geography_4": True, "validation_Math_15": True}
    # eval_multi_choice(["A", "C"], "B") is False (OFFICIAL)
    assert not mmmu_scores({**responses, "validation_Art_1": "(B)"}, records)["correct"]["validation_Art_1"]


def test_hidden_test_answers_are_refused():
    records = [MultipleChoiceRecord(f"test_Art_{k}", "<image 1> ?", ("x", "y"), "?") for k in (1, 2)]
    with pytest.raises(ValueError, match=r"2 record\(s\) have no published answer \('\?'\): 'test_Art_1', "
                                         r"'test_Art_2'; MMMU's test answers are hidden"):
        mmmu_scores({"test_Art_1": "A", "test_Art_2": "B"}, records)


def test_coverage_errors(records, responses):
    partial = dict(responses)
    del partial["validation_Math_5"]
    with pytest.raises(ValueError, match=r"no response for 1 record\(s\): 'validation_Math_5'"):
        mmmu_scores(partial, records)
    subset = mmmu_scores(partial, records, require_all=False)
    assert subset["overall"] == {"acc": round(15 / 18, 3), "num": 18} and subset["missing"] == 1
    assert mmmu_scores(responses, records)["missing"] == 0
    with pytest.raises(ValueError, match=r"not in the records: 'validation_Music_1'"):
        mmmu_scores({**responses, "validation_Music_1": "A"}, records)
    with pytest.raises(ValueError, match="expected a string"):
        mmmu_scores({**responses, "validation_Math_5": 8}, records)


def test_jsonl_and_json_read_the_same():
    assert read_mmmu_predictions(FIXTURES / "responses.jsonl") == read_mmmu_predictions(FIXTURES / "responses.json")


def test_prediction_file_formats(tmp_path):
    listed = tmp_path / "preds.json"
    listed.write_text(json.dumps([{"id": "validation_Art_1", "response": "A"}]))
    assert read_mmmu_predictions(listed) == {"validation_Art_1": "A"}
    one_line = tmp_path / "one.txt"
    one_line.write_text(json.dumps({"id": "validation_Art_1", "response": "A"}) + "\n")
    assert read_mmmu_predictions(one_line) == {"validation_Art_1": "A"}
    no_suffix = tmp_path / "lines.txt"
    no_suffix.write_text('{"id": "a_X_1", "response": "A"}\n{"id": "a_X_2", "response": "B"}\n')
    assert read_mmmu_predictions(no_suffix) == {"a_X_1": "A", "a_X_2": "B"}


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": "a_X_1", "response": "A"}\n\n{"id": "a_X_2"}\n', r"record line 3, field 'response': missing"),
        ('{"id": "a_X_1", "response": "A"}\n{"id": "a_X_1", "response": "B"}\n', r"line 2, field 'id': id 'a_X_1' already given at line 1"),
        ('{"id": "a_X_1", "response": 3}\n', r"line 1, field 'response': expected a string, got int"),
        ('{"id": "a_X_1", "response": "A"}\n{"id": \n', r"record line 2: not valid JSON"),
        ('["a"]\n', r"record line 1: expected an object, got list"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, content, message):
    path = tmp_path / "preds.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message) as info:
        read_mmmu_predictions(path)
    assert str(path) in str(info.value)


def test_json_errors(tmp_path):
    path = tmp_path / "preds.json"
    path.write_text('{"validation_Art_1": ["A"]}')
    with pytest.raises(DataFormatError, match=r"record 'validation_Art_1': expected a string response, got list"):
        read_mmmu_predictions(path)
    path.write_text('{"validation_Art_1": "A",}')
    with pytest.raises(DataFormatError, match=r"not valid JSON \(line 1"):
        read_mmmu_predictions(path)
    path.write_text("42")
    with pytest.raises(DataFormatError, match="got int"):
        read_mmmu_predictions(path)
    with pytest.raises(DataFormatError, match="cannot read"):
        read_mmmu_predictions(tmp_path / "absent.json")
