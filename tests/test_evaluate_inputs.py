"""`multimodal evaluate` on annotation files (a VQA v2 pair, COCO captions, a JSONL table, LLaVA
dialogues) gives the report a dataset folder gives; wrong input is refused naming the flag."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from multimodal_models.cli import main
from multimodal_models.data.splits import DataConfig, SplitFiles
from multimodal_models.errors import MultimodalError
from multimodal_models.evaluate.report import as_data_config, check_data, evaluate_model
from multimodal_models.loading import load

from .conftest import tiny_config


@pytest.fixture(scope="module")
def vlm(tiny_shapes, tmp_path_factory) -> Path:
    """A tiny VLM after one step: its answers already differ from question to question, which is all
    comparing two ways of reading the same data needs."""
    root = tmp_path_factory.mktemp("evaluate_inputs")
    config = root / "vlm.yaml"
    config.write_text(yaml.safe_dump(tiny_config("vlm", tiny_shapes, root / "run")))
    assert main(["train", str(config), "--quiet", "train.steps=1", "train.eval_every=1", "train.save_every=1"]) == 0
    return root / "run" / "model"


@pytest.fixture(autouse=True)
def no_meteor(monkeypatch):
    """METEOR runs a Java process for seconds per report; every path here scores without it alike."""
    monkeypatch.setattr("multimodal_models.evaluate.report.java_available", lambda: False)


@dataclass
class Report:
    metrics: dict
    predictions: dict
    markdown: str
    plots: list[str]


def read_report(out: Path) -> Report:
    predictions = out / "predictions.json"  # written where a task keeps predictions (dialogues do not)
    return Report(json.loads((out / "metrics.json").read_text()),
                  json.loads(predictions.read_text()) if predictions.exists() else {},
                  (out / "report.md").read_text(), sorted(p.name for p in out.glob("*.png")))


def evaluate(capsys, model: Path, out: Path, *flags: str) -> Report:
    assert main(["evaluate", "--model", str(model), "--out", str(out), "--quiet", *flags]) == 0
    capsys.readouterr()
    return read_report(out)


def shapes_test_files(shapes: Path) -> dict[str, str]:
    """The test split's files, as flags."""
    manifest = json.loads((shapes / "dataset.json").read_text())["splits"]["test"]
    return {key: str(shapes / path) for key, path in manifest.items()}


def flags(files: dict[str, str], *keys: str) -> list[str]:
    return [item for key in keys for item in ("--" + key.replace("_", "-"), files[key])]


def without(metrics: dict, *keys: str) -> dict:
    return {k: v for k, v in metrics.items() if k not in keys}


WHERE = ("data", "split", "seconds")  # what names the data and the run, not what was measured


def test_the_vqa_pair_and_captions_give_what_the_dataset_folder_gives(vlm, tiny_shapes, tmp_path, capsys):
    files = shapes_test_files(tiny_shapes)
    folder = evaluate(capsys, vlm, tmp_path / "folder", "--data", str(tiny_shapes), "--split", "test")
    given = evaluate(capsys, vlm, tmp_path / "files", *flags(files, "vqa_questions", "vqa_annotations", "captions",
                                                             "images"))
    assert given.metrics["vqa"] == folder.metrics["vqa"]
    assert given.predictions["vqa"] == folder.predictions["vqa"]
    # the grounded caption scores need the scene graphs, which only the folder named here
    assert given.metrics["captions"] == without(folder.metrics["captions"], "grounding")
    assert given.predictions["captions"] == folder.predictions["captions"]
    assert given.metrics["split"] is None and folder.metrics["split"] == "test"
    title = given.markdown.splitlines()[0]  # the files evaluated, and no split name
    assert title.startswith("# Evaluation: vlm on ") and files["vqa_questions"] in title and title.endswith(".json")
    assert set(given.plots) == {"vqa_per_question_type.png", "vqa_samples.png", "caption_samples.png"}

    # every file of the split given: the folder's report, to the number, the plot and the line
    every = evaluate(capsys, vlm, tmp_path / "every", *flags(files, *files))
    assert without(every.metrics, *WHERE) == without(folder.metrics, *WHERE)
    assert every.metrics["files"] == folder.metrics["files"]  # the very same files were read
    assert every.predictions == folder.predictions
    assert every.markdown.splitlines()[1:] == folder.markdown.splitlines()[1:]
    assert every.plots == folder.plots


def test_a_jsonl_table_scores_as_the_vqa_pair(vlm, tiny_shapes, tmp_path, capsys):
    files = shapes_test_files(tiny_shapes)
    questions = json.loads(Path(files["vqa_questions"]).read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads(Path(files["vqa_annotations"]).read_text())["annotations"]}
    names = {i["id"]: i["file_name"] for i in json.loads(Path(files["captions"]).read_text())["images"]}
    table = tmp_path / "vqa.jsonl"
    with table.open("w") as f:
        for q in questions:
            a = annotations[q["question_id"]]
            f.write(json.dumps({"image": names[q["image_id"]], "question": q["question"],
                                "answer": a["multiple_choice_answer"], "answers": [x["answer"] for x in a["answers"]],
                                "question_id": q["question_id"], "question_type": a["question_type"],
                                "answer_type": a["answer_type"]}) + "\n")
    pair = evaluate(capsys, vlm, tmp_path / "pair", *flags(files, "vqa_questions", "vqa_annotations", "images"))
    rows = evaluate(capsys, vlm, tmp_path / "table", "--table", str(table), "--images", files["images"])
    assert rows.metrics["vqa"] == pair.metrics["vqa"]
    assert rows.metrics["vqa"]["num_questions"] == len(questions)
    assert rows.predictions == pair.predictions
    assert rows.plots == pair.plots == ["vqa_per_question_type.png", "vqa_samples.png"]


def test_llava_dialogues_evaluate_from_the_command_and_from_python(vlm, tiny_shapes, tmp_path, capsys):
    files = shapes_test_files(tiny_shapes)
    chats = evaluate(capsys, vlm, tmp_path / "cli", *flags(files, "dialogues", "images"))
    dialogue = chats.metrics["dialogue"]
    assert dialogue["num_dialogues"] == 8 and sum(dialogue["numPerQuestionType"].values()) == dialogue["num_turns"]
    assert "## Dialogue" in chats.markdown and chats.plots == ["dialogue_per_question_type.png"]
    assert set(chats.metrics) == {"model_type", "data", "split", "files", "dialogue", "seconds"}
    # Python callers give the same files as a SplitFiles (or a DataConfig)
    results = evaluate_model(load(vlm), SplitFiles(dialogues=files["dialogues"], images=files["images"]),
                             tmp_path / "python", progress=False)
    assert results["dialogue"] == dialogue
    assert read_report(tmp_path / "python").markdown == chats.markdown


@pytest.mark.parametrize("given, message", [
    ([], "nothing to evaluate: give --data DIR"),
    (["--vqa-annotations", "{vqa_annotations}"], "--vqa-annotations needs --vqa-questions FILE"),
    (["--vqa-questions", "{vqa_questions}"], "--vqa-questions needs --vqa-annotations FILE"),
    (["--captions", "{tmp}/missing.json"], "--captions {tmp}/missing.json: no such file"),
    (["--table", "{tmp}/missing.csv"], "--table {tmp}/missing.csv: no such file"),
    (["--captions", "{captions}", "--images", "{tmp}/nowhere"], "--images {tmp}/nowhere: no such folder"),
    (["--data", "{tmp}/nowhere"], "--data {tmp}/nowhere: no such folder"),
    (["--data", "{tmp}"], "--data {tmp}: no dataset.json in it"),
    (["--split", "test", "--captions", "{captions}"], "--split picks a split of --data"),
])
def test_wrong_data_is_refused_naming_the_flag(tiny_shapes, tmp_path, capsys, given, message):
    values = {**shapes_test_files(tiny_shapes), "tmp": str(tmp_path)}
    # the data is checked before the model loads: a model name that does not exist is never reached
    argv = ["evaluate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
            *(arg.format(**values) for arg in given)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("multimodal: error: ") and message.format(**values) in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_python_callers_give_a_folder_a_data_config_or_split_files(tiny_shapes, tmp_path):
    assert as_data_config(tiny_shapes) == DataConfig(root=str(tiny_shapes), eval_split="test", eval=SplitFiles())
    assert as_data_config(str(tiny_shapes), "val").eval_split == "val"  # the call of before: folder and split
    # a DataConfig as training reads it: its paths relative to root, overriding the split's
    config = DataConfig(root=str(tiny_shapes), eval_split="val",
                        eval=SplitFiles(captions="annotations/captions_test.json"))
    files = check_data(as_data_config(config, "test"))
    assert files.captions == str(tiny_shapes / "annotations/captions_test.json")
    assert files.vqa_questions == str(tiny_shapes / "vqa/shapes_test_questions.json")
    # checked before the model is used; errors name the dataclass field
    with pytest.raises(MultimodalError, match="SplitFiles.vqa_annotations needs SplitFiles.vqa_questions"):
        evaluate_model(None, SplitFiles(vqa_annotations=shapes_test_files(tiny_shapes)["vqa_annotations"]), tmp_path)
    with pytest.raises(MultimodalError, match="split picks a split of DataConfig.root"):
        evaluate_model(None, SplitFiles(captions=shapes_test_files(tiny_shapes)["captions"]), tmp_path, split="test")
