"""The VQA task: images encoded once for all their questions, and an encoder started from a dual encoder's tower."""

from __future__ import annotations

import random

import pytest
import torch

from multimodal_models.loading import load
from multimodal_models.training.config import config_from_raw
from multimodal_models.training.loop import build_task, train

from .conftest import tiny_config


def vqa_task(tiny_shapes, tmp_path, **options):
    raw = tiny_config("vqa", tiny_shapes, tmp_path / "run")
    raw["task_options"] = options
    return build_task(config_from_raw(raw), progress=False)


def test_a_grouped_batch_holds_each_image_once_with_all_its_questions(tiny_shapes, tmp_path):
    grouped = vqa_task(tiny_shapes, tmp_path)
    flat = vqa_task(tiny_shapes, tmp_path, group_by_image=False)
    assert len(grouped) == len(grouped.store) < len(flat) == len(flat.records)
    batch = grouped.make_batch([0, 3], random.Random(0))
    questions = grouped.groups[0] + grouped.groups[3]
    assert batch["pixels"].shape[0] == batch["images"] == 2
    assert batch["examples"] == len(questions) == batch["ids"].shape[0]
    assert batch["image_index"].tolist() == [0] * len(grouped.groups[0]) + [1] * len(grouped.groups[3])
    # the same questions as separate examples, each with its own copy of its image: the same loss
    same = flat.make_batch(questions, random.Random(0))
    assert same["pixels"].shape[0] == len(questions) and "image_index" not in same
    model = grouped.model.eval()
    torch.testing.assert_close(grouped.loss(model, batch), flat.loss(model, same))
    # a sample of each image's questions, chosen by the step's random generator
    capped = vqa_task(tiny_shapes, tmp_path, questions_per_image=2)
    batch = capped.make_batch([0, 1, 2], random.Random(0))
    assert batch["examples"] == 6 and batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(batch["ids"], capped.make_batch([0, 1, 2], random.Random(0))["ids"])


def test_the_encoder_starts_from_a_dual_encoders_tower(tiny_shapes, tmp_path):
    train(config_from_raw(tiny_config("contrastive", tiny_shapes, tmp_path / "clip", steps=2, eval_every=2)),
          progress=False)
    tower = load(tmp_path / "clip" / "model")
    task = vqa_task(tiny_shapes, tmp_path, vision_from=str(tmp_path / "clip" / "model"), freeze_vision=True)
    model = task.model
    assert model.config.encoder == "vit" and model.config.vision == tower.vision.config
    for name, value in tower.vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[name], value), name
    assert model.image_processor == tower.image_processor  # the pixels the tower learned from
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())
    with pytest.raises(ValueError, match="freeze_vision"):
        vqa_task(tiny_shapes, tmp_path, freeze_vision=True)
    # a config that names only the data takes the tower for its encoder and the rest of the recipe
    only_data = {"task": "vqa", "data": {"root": str(tiny_shapes)}, "output": str(tmp_path / "recipe"),
                 "task_options": {"vision_from": str(tmp_path / "clip" / "model")}}
    chosen = build_task(config_from_raw(only_data), progress=False).model.config
    assert chosen.encoder == "vit" and chosen.vision == tower.vision.config and chosen.fusion.kind == "film"
    raw = tiny_config("vqa", tiny_shapes, tmp_path / "run")
    raw["model"] = {**raw["model"], "encoder": "cnn"}
    raw["task_options"] = {"vision_from": str(tmp_path / "clip" / "model")}
    with pytest.raises(ValueError, match="model.encoder"):
        build_task(config_from_raw(raw), progress=False)


def test_a_config_that_names_only_the_data_gets_a_recipe_chosen_from_it(tiny_shapes, tmp_path, capsys):
    raw = {"task": "vqa", "data": {"root": str(tiny_shapes)}, "train": {"steps": 2, "eval_samples": 4},
           "output": str(tmp_path / "run")}
    summary = train(config_from_raw(raw), progress=True)
    said = capsys.readouterr().out
    assert "a recipe for 48 images" in said and "64 px" in said and "film fusion" in said and "8 x 8 grid" in said
    assert "steps" not in said.split("train:")[1]  # the config gave them
    model = load(summary["model"])
    assert model.config.encoder == "cnn" and model.config.image_size == 64 and model.config.grid == 8
    written = (tmp_path / "run" / "config.yaml").read_text()  # the run's config says what was chosen
    assert "encoder: cnn" in written and "batch_size: 32" in written and "steps: 2" in written
    raw = {"task": "contrastive", "data": {"root": str(tiny_shapes)}}
    with pytest.raises(ValueError, match="model"):
        config_from_raw(raw)


def test_the_shapes_vqa_task_makes_its_data_and_reads_nothing_else_of_the_world(tmp_path, capsys):
    """configs/shapes-vqa.yaml on a fresh clone: the data is generated first, then the general vqa task trains."""
    raw = {"task": "shapes-vqa", "data": {"root": str(tmp_path / "shapes")},
           "task_options": {"generate": {"seed": 3, "train": 12, "val": 4, "test": 4, "test_compositional": 4}},
           "train": {"steps": 2, "eval_samples": 4}, "output": str(tmp_path / "run")}
    summary = train(config_from_raw(raw), progress=False)
    assert (tmp_path / "shapes" / "dataset.json").is_file()
    assert load(summary["model"]).config.encoder == "cnn"
