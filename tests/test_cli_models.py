"""The model commands: train, evaluate (report + plots), caption, ask, chat, classify, embed,
and the fusion experiment, on tiny models trained in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from multimodal_models.cli import main
from multimodal_models.loading import load, resolve

from .conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    models = {}
    for task in ("vlm", "contrastive", "vqa"):
        config = root / f"{task}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(task, tiny_shapes, root / task)))
        assert main(["train", str(config), "--quiet", "train.steps=4", "train.eval_every=4"]) == 0
        models[task] = root / task / "model"
    return models


def an_image(tiny_shapes):
    return str(next((tiny_shapes / "images" / "test").glob("*.png")))


def test_caption_ask_and_chat(trained, tiny_shapes, capsys, monkeypatch):
    image = an_image(tiny_shapes)
    assert main(["caption", image, "--model", str(trained["vlm"]), "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith(image + "\t")
    assert main(["ask", image, "is there a red circle?", "--model", str(trained["vlm"]), "--max-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["ask", image, "is there a red circle?", "--model", str(trained["vqa"])]) == 0
    assert "confidence" in capsys.readouterr().out
    replies = iter(["is there a circle?", "what color is it?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["chat", image, "--model", str(trained["vlm"]), "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_classify_and_embed(trained, tiny_shapes, tmp_path, capsys):
    image = an_image(tiny_shapes)
    assert main(["classify", image, "--labels", "a red circle,a blue star,a green square", "--model",
                 str(trained["contrastive"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and abs(sum(float(line.split("\t")[0]) for line in lines) - 1) < 1e-3
    out = tmp_path / "vectors.npy"
    assert main(["embed", "--texts", "a red circle", "two stars", "--model", str(trained["contrastive"]),
                 "--out", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert main(["classify", image, "--labels", "x,y", "--model", str(trained["vlm"])]) == 2
    assert "dual_encoder" in capsys.readouterr().err


def test_evaluate_writes_metrics_report_and_plots(trained, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(trained["vlm"]), "--data", str(tiny_shapes), "--split", "test",
                 "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"vqa", "captions", "dialogue", "multiple_choice"} <= set(metrics)
    assert "grounding" in metrics["captions"] and 0 <= metrics["vqa"]["overall"] <= 100
    for name in ("report.md", "vqa_per_question_type.png", "vqa_samples.png", "caption_samples.png",
                 "dialogue_per_question_type.png"):
        assert (out / name).is_file(), name
    dialogue = metrics["dialogue"]  # every Shapes dialogue turn says its form of question
    assert sum(dialogue["numPerQuestionType"].values()) == dialogue["num_turns"]
    assert {"exist", "query_it", "spatial_it"} <= set(dialogue["perQuestionType"])
    assert "| form of question | accuracy | turns |" in (out / "report.md").read_text()
    out = tmp_path / "report_clip"
    assert main(["evaluate", "--model", str(trained["contrastive"]), "--data", str(tiny_shapes), "--out", str(out),
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["retrieval"]["ceiling"]["basis"] == "scene graphs"
    assert (out / "recall_at_k.png").is_file()
    assert "Ambiguity ceiling" in (out / "report.md").read_text()


def test_retrieval_reranked_by_the_lm_in_evaluate_and_search(trained, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "report_rerank"
    assert main(["evaluate", "--model", str(trained["contrastive"]), "--data", str(tiny_shapes), "--out", str(out),
                 "--rerank-with", str(trained["vlm"]), "--rerank-top", "3", "--quiet"]) == 0
    retrieval = json.loads((out / "metrics.json").read_text())["retrieval"]
    reranked = retrieval["reranked"]
    assert reranked["top"] == 3 and reranked["similarity_weight"] == 20.0
    # only each caption's top 3 are reordered: what was found by rank 3 is still found by rank 3, and below it
    # nothing moves
    for k in (3, 4, 5, 10):
        assert reranked["text_to_image"][f"R@{k}"] == retrieval["text_to_image"][f"R@{k}"]
    assert "reranked by the LM" in (out / "report.md").read_text()
    assert "t2i_R@1_reranked" in json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--model", str(trained["contrastive"]), "--data", str(tiny_shapes), "--out", str(out),
                 "--rerank-with", str(trained["contrastive"]), "--quiet"]) == 2
    assert "vlm" in capsys.readouterr().err

    folder = tiny_shapes / "images" / "test"
    index = tmp_path / "index"
    assert main(["index", str(folder), "--model", str(trained["contrastive"]), "--out", str(index), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "a red circle", "-k", "2", "--rerank-with", str(trained["vlm"]),
                 "--rerank-similarity-weight", "0", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    vlm = load(trained["vlm"])
    pixels = vlm.image_processor([hit["file"] for hit in hits])
    expected = vlm.text_log_likelihoods(["a red circle"] * 2, vlm.image_features(pixels))
    assert [hit["score"] for hit in hits] == pytest.approx(expected.tolist(), abs=1e-4)
    assert main(["search", str(index), "--image", str(next(folder.glob("*.png"))), "--rerank-with",
                 str(trained["vlm"])]) == 2
    assert "text query" in capsys.readouterr().err


def test_fusion_experiment_writes_a_table_and_a_plot(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "fusion"
    assert main(["experiment", "fusion", "--data", str(tiny_shapes), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--eval-samples", "4", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["model"] for r in rows] == ["early fusion", "middle fusion", "late fusion", "FiLM", "relation", "native LM"]
    for row in rows:
        assert row["parameters"] > 0 and row["latency_ms"] > 0
        assert set(row["test"]) == {"overall", "perQuestionType"} and "test_compositional" in row
    assert set(results["blind"]) == {"test", "test_compositional"}
    assert (out / "accuracy_per_question_type.png").is_file()
    report = (out / "report.md").read_text()
    assert "| native LM |" in report and "| blind (question only) |" in report and "| **best** |" in report
    # a rerun with the same settings trains nothing again; other settings start over
    stamp = (out / "results.json").stat().st_mtime_ns
    assert main(["experiment", "fusion", "--data", str(tiny_shapes), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--eval-samples", "4", "--quiet", "--models", "FiLM"]) == 0
    assert (out / "results.json").stat().st_mtime_ns == stamp
    assert "| early fusion |" not in (out / "report.md").read_text()


def test_unknown_model_names_say_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match="shapes-vlm"):
        resolve("no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)


def test_a_model_of_the_wrong_kind_is_refused_by_name(tiny_shapes, capsys):
    from multimodal_models.errors import WrongModelError

    with pytest.raises(WrongModelError, match="shapes-clip is a shapes_clip model; this needs a vlm model"):
        load("shapes-clip", expect="vlm")
    assert load("shapes-clip", expect="dual_encoder").model_type == "shapes_clip"  # a DualEncoder, extended
    image = next((tiny_shapes / "images" / "test").glob("*.png"))
    assert main(["caption", str(image), "--model", "shapes-clip"]) == 2
    assert "shapes-clip is a shapes_clip model; this command needs a vlm model" in capsys.readouterr().err
