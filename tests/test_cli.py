"""The `multimodal` command: help everywhere, scoring commands print one JSON object, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from multimodal_models.cli import build_parser, main
from multimodal_models.shapes.generate import ShapesConfig, generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_shapes")
    generate(ShapesConfig(seed=5, train=200, val=20, test=30, test_compositional=10), out, workers=1, progress=False)
    return out


def subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    paths = list(subcommand_paths(build_parser()))
    assert ("shapes", "generate") in paths and ("score", "vqa") in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: multimodal" in capsys.readouterr().out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "multimodal_models.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "score" in result.stdout


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_score_vqa_perfect_and_blind(shapes, tmp_path, capsys):
    questions = json.loads((shapes / "vqa/shapes_test_questions.json").read_text())["questions"]
    annotations = json.loads((shapes / "vqa/shapes_test_annotations.json").read_text())["annotations"]
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]} for a in annotations]))
    scores = run_json(capsys, ["score", "vqa", "--predictions", str(perfect), "--data", str(shapes), "--split", "test"])
    assert scores["overall"] == 100.0 and set(scores["perAnswerType"]) == {"yes/no", "number", "other"}
    assert len(scores["perQuestionType"]) == 11
    blind = tmp_path / "blind.json"
    assert main(["baseline", "blind", "--data", str(shapes), "--out", str(blind)]) == 0
    capsys.readouterr()
    scores = run_json(capsys, ["score", "vqa", "--predictions", str(blind),
                               "--questions", str(shapes / "vqa/shapes_test_questions.json"),
                               "--annotations", str(shapes / "vqa/shapes_test_annotations.json")])
    # the question-only baseline on this seed's 30 test images: far below the perfect 100, yes/no near chance
    assert scores["overall"] == 27.5
    assert scores["perAnswerType"] == {"other": 14.89, "yes/no": 50.81, "number": 16.67}
    assert len(json.loads(blind.read_text())) == len(questions)


def test_score_caption_and_grounding(shapes, tmp_path, capsys):
    captions = json.loads((shapes / "annotations/captions_test.json").read_text())
    first = {}
    for a in captions["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    predictions = tmp_path / "captions.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in first.items()]))
    scores = run_json(capsys, ["score", "caption", "--predictions", str(predictions), "--data", str(shapes),
                               "--tokenizer", "python"])
    assert scores["num_images"] == 30 and scores["tokenizer"] == "python"
    assert scores["BLEU-1"] > 0.5 and scores["CIDEr"] > 1.0
    grounding = run_json(capsys, ["score", "grounding", "--predictions", str(predictions), "--data", str(shapes)])
    assert grounding["claim_precision"] == 100.0 and grounding["hallucination_rate"] == 0.0


def test_score_mmmu_on_shapes_items(shapes, tmp_path, capsys):
    from multimodal_models.data import formats

    records = formats.read_mmmu(shapes / "mmmu/Shapes/test-00000-of-00001.parquet")
    predictions = tmp_path / "mmmu.json"
    predictions.write_text(json.dumps({r.id: f"The answer is ({r.answer})." for r in records}))
    scores = run_json(capsys, ["score", "mmmu", "--predictions", str(predictions), "--data", str(shapes / "mmmu/Shapes/test-00000-of-00001.parquet")])
    assert scores["overall"]["acc"] == 1.0 and scores["overall"]["num"] == len(records)


def test_malformed_input_gives_one_line_error_naming_file_record_and_field(shapes, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_id": 1, "answer": "yes"}, {"question_id": 2}]))
    assert main(["score", "vqa", "--predictions", str(bad), "--data", str(shapes)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.json" in err and "[1]" in err and "answer" in err
    assert main(["score", "vqa", "--predictions", str(bad)]) == 2
    assert "--questions" in capsys.readouterr().err
    assert main(["score", "grounding", "--predictions", str(bad), "--data", str(tmp_path)]) == 2
    assert "dataset.json" in capsys.readouterr().err
