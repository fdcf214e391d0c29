"""A run's config is typed through and through: task_options too, refused at load time naming the key."""

import pytest
import yaml

from multimodal_models.errors import DataFormatError
from multimodal_models.shapes.tasks import ShapesVLMOptions
from multimodal_models.training.config import load_config
from multimodal_models.training.tasks import ContrastiveOptions
from multimodal_models.training.vlm_task import VLMOptions


def write(tmp_path, **raw):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"task": "vlm", "data": {"root": "data"}, "model": {}, **raw}))
    return path


def test_task_options_become_the_tasks_dataclass(tmp_path):
    config = load_config(write(tmp_path, task_options={"question_rates": {"exist": 1}, "captions_per_image": 2}))
    assert isinstance(config.task_options, VLMOptions)
    assert config.task_options.question_rates == {"exist": 1.0} and config.task_options.captions_per_image == 2
    shapes = load_config(write(tmp_path, task="shapes-vlm", task_options={"exact_grounding": "numbers",
                                                                         "generate": {"seed": 3, "train": 5}}))
    assert isinstance(shapes.task_options, ShapesVLMOptions) and shapes.task_options.generate.train == 5
    assert isinstance(load_config(write(tmp_path, task="contrastive")).task_options, ContrastiveOptions)


@pytest.mark.parametrize("raw, message", [
    ({"train": {"steps": "abc"}}, r"train\.steps: expected int, got 'abc'"),
    ({"train": {"lr": True}}, r"train\.lr: expected float, got True"),
    ({"task_options": {"question_rates": {"exist": "a lot"}}}, r"task_options\.question_rates\.exist: expected float"),
    ({"task_options": {"questions_per_img": 2}}, r"unknown VLMOptions settings \['questions_per_img'\]"),
    ({"task_options": {"grounding_weight": 1.0}}, r"unknown VLMOptions settings \['grounding_weight'\]"),
    ({"task_options": {"lora": {"rank": "big"}}}, r"task_options\.lora\.rank: expected int"),
    ({"model": {"decoder": {"depth": 2.5}}}, None),  # model configs are checked by the task that builds them
])
def test_wrong_types_and_unknown_keys_are_refused_naming_them(tmp_path, raw, message):
    path = write(tmp_path, **raw)
    if message is None:
        load_config(path)
        return
    with pytest.raises(DataFormatError, match=message):
        load_config(path)


def test_overrides_are_typed_too(tmp_path):
    path = write(tmp_path)
    assert load_config(path, ["train.steps=200"]).train.steps == 200
    with pytest.raises(DataFormatError, match=r"train\.steps: expected int, got 'abc'"):
        load_config(path, ["train.steps=abc"])


def test_a_shapes_task_generates_its_missing_data_and_leaves_present_data_alone(tmp_path):
    from multimodal_models.registry import task_class

    root = tmp_path / "shapes"
    config = load_config(write(tmp_path, task="shapes-vlm", data={"root": str(root)},
                               task_options={"generate": {"seed": 1, "train": 2, "val": 1, "test": 1,
                                                          "test_compositional": 1}}))
    task_class("shapes-vlm").prepare_data(config)
    manifest = (root / "dataset.json").read_text()
    assert len(list((root / "images" / "train").glob("*.png"))) == 2
    config.task_options.generate = type(config.task_options.generate)(seed=2, train=3)
    task_class("shapes-vlm").prepare_data(config)  # there already: not written again
    assert (root / "dataset.json").read_text() == manifest
    task_class("vlm").prepare_data(config)  # the general task generates nothing
