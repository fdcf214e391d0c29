"""Training from Python: multimodal_models.train(config, **overrides), its callbacks and TensorBoard logs."""

from __future__ import annotations

import json

import pytest
import yaml

import multimodal_models
from multimodal_models.errors import DataFormatError
from multimodal_models.training.callbacks import Callback
from multimodal_models.training.config import as_config

from .conftest import tiny_config


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, config, start_step):
        self.events.append(("begin", start_step, config.train.steps))

    def on_log(self, step, record):
        self.events.append(("log", step, record["loss"]))

    def on_evaluate(self, step, metrics):
        self.events.append(("evaluate", step, dict(metrics)))

    def on_save(self, step, path):
        self.events.append(("save", step, path.name))

    def on_train_end(self, summary):
        self.events.append(("end", summary["steps_done"], summary["model"]))


def test_overrides_nest_by_keyword_dotted_key_or_double_underscore(tiny_shapes, tmp_path):
    raw = tiny_config("vqa", tiny_shapes, tmp_path / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = as_config(path, {"train": {"steps": 9}, "train.lr": 0.01, "train__warmup": 1, "output": "elsewhere"})
    assert (config.train.steps, config.train.lr, config.train.warmup, config.output) == (9, 0.01, 1, "elsewhere")
    assert config.train.batch_size == raw["train"]["batch_size"]  # the rest of the section stays
    assert as_config(config, {"train__steps": 4}).train.steps == 4  # a RunConfig too
    assert as_config(raw).train.steps == raw["train"]["steps"]  # and a dict
    with pytest.raises(DataFormatError, match="train.device"):
        as_config(raw, {"train__device": "gpu"})
    with pytest.raises(DataFormatError, match="train.tensorboard"):
        as_config(raw, {"train__tensorboard": "yes"})


def test_train_from_python_returns_the_run_calls_back_and_writes_tensorboard(tiny_shapes, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard logs are written only when tensorboard is installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_config("vqa", tiny_shapes, tmp_path / "ignored", steps=6, eval_every=3, save_every=3, log_every=2)
    recorder, seen = Recorder(), []
    result = multimodal_models.train(raw, output=str(tmp_path / "run"), progress=False,
                                     callbacks=[recorder, lambda step, record: seen.append(step)])
    assert result["output"] == str(tmp_path / "run") and result["steps_done"] == 6
    assert multimodal_models.load(result["model"]).model_type == "fusion_classifier"
    kinds = [event[0] for event in recorder.events]
    assert kinds[0] == "begin" and kinds[-1] == "end" and recorder.events[0][1:] == (0, 6)
    assert [e[1] for e in recorder.events if e[0] == "log"] == seen == [2, 4, 6]
    evaluations = [e for e in recorder.events if e[0] == "evaluate"]
    assert [e[1] for e in evaluations] == [3, 6] and all("vqa" in e[2] for e in evaluations)
    assert [e for e in recorder.events if e[0] == "save" and e[2] == "last"] == [("save", 3, "last"), ("save", 6, "last")]
    assert recorder.events[-1] == ("end", 6, result["model"])
    # the log records and the callbacks agree with log.jsonl
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == [e[2] for e in recorder.events if e[0] == "log"]

    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [2, 4, 6]
    assert [round(s.value, 4) for s in events.Scalars("train/loss")] == [round(r["loss"], 4) for r in log if "loss" in r]
    assert [s.step for s in events.Scalars("eval/vqa")] == [3, 6]


def test_tensorboard_can_be_turned_off(tiny_shapes, tmp_path):
    raw = tiny_config("vqa", tiny_shapes, tmp_path / "run", steps=2, eval_every=2)
    multimodal_models.train(raw, progress=False, train__tensorboard=False)
    assert (tmp_path / "run/model/config.json").is_file() and not (tmp_path / "run/tensorboard").exists()
