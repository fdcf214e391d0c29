"""data.train_fraction (nested, machine-independent shares of the training images) and the
data-efficiency experiment built on it: its outputs, its counts and its resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from multimodal_models.cli import main
from multimodal_models.data.splits import DataConfig, image_key, load_split
from multimodal_models.experiments import data_efficiency
from multimodal_models.training.config import config_from_raw, load_config
from multimodal_models.training.loop import train

from .conftest import tiny_config


def summary_of(printed: str) -> dict:
    """The command's JSON summary (after the training loop's evaluation lines, which it prints even when quiet)."""
    return json.loads(printed[printed.index("{\n"):])


def train_images(root: Path, fraction: float) -> set[str]:
    """The kept training images, named relative to the data set folder."""
    split = load_split(DataConfig(root=str(root), train_fraction=fraction), "train")
    return {Path(image_key(r.image)).relative_to(root).as_posix() for r in split.vqa}


def test_train_fraction_keeps_nested_shares_of_the_images_with_all_their_records(tiny_shapes, tmp_path):
    everything = load_split(DataConfig(root=str(tiny_shapes)), "train")
    shares = {f: train_images(tiny_shapes, f) for f in (0.001, 0.25, 0.5, 1.0)}
    assert len(shares[0.001]) == 1  # never none
    assert shares[0.001] <= shares[0.25] <= shares[0.5] <= shares[1.0]
    assert len(shares[1.0]) == 48 and 12 <= len(shares[0.5]) <= 36
    half = load_split(DataConfig(root=str(tiny_shapes), train_fraction=0.5), "train")
    kept = {image_key(r.image) for r in half.vqa}
    # every record about a kept image, of every kind, and none about another
    assert len(half.vqa) == sum(image_key(r.image) in kept for r in everything.vqa)
    assert {image_key(r.image) for r in half.captions} == kept
    assert {image_key(s) for r in half.conversations for s in r.images} == kept
    assert len(half.conversations) == sum(all(image_key(s) in kept for s in r.images) for r in everything.conversations)
    # the eval split is never cut
    whole_eval = load_split(DataConfig(root=str(tiny_shapes)), "eval")
    assert len(load_split(DataConfig(root=str(tiny_shapes), train_fraction=0.1), "eval").vqa) == len(whole_eval.vqa)
    # the same images from the same data set elsewhere (another machine): names, not absolute paths, decide
    moved = tmp_path / "elsewhere" / "shapes"
    shutil.copytree(tiny_shapes, moved)
    assert train_images(moved, 0.5) == shares[0.5]
    assert train_images(tiny_shapes, 0.5) == shares[0.5]


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, True])
def test_a_train_fraction_outside_0_1_is_refused_naming_the_field(tiny_shapes, fraction):
    with pytest.raises(ValueError, match=r"data\.train_fraction"):
        load_split(DataConfig(root=str(tiny_shapes), train_fraction=fraction), "train")


def test_train_fraction_is_read_from_a_config(tiny_shapes, tmp_path):
    path = tmp_path / "vqa.yaml"
    path.write_text(yaml.safe_dump(tiny_config("vqa", tiny_shapes, tmp_path / "run")))
    assert load_config(path, ["data.train_fraction=0.25"]).data.train_fraction == 0.25


# --- the experiment -------------------------------------------------------------------------


def trained(task: str, data: Path, root: Path, steps: int) -> Path:
    """The saved model of a tiny run of `task`: something to start from is all the experiment needs."""
    train(config_from_raw(tiny_config(task, data, root / "run", steps=steps, eval_every=steps, save_every=steps)),
          progress=False)
    return root / "run" / "model"


@pytest.fixture(scope="module")
def tower(tiny_shapes, tmp_path_factory) -> Path:
    return trained("contrastive", tiny_shapes, tmp_path_factory.mktemp("tower"), steps=2)


@pytest.fixture(scope="module")
def vlm(tiny_shapes, tmp_path_factory) -> Path:
    return trained("vlm", tiny_shapes, tmp_path_factory.mktemp("vlm"), steps=1)


def test_the_experiment_writes_its_table_and_plot_and_a_rerun_skips_finished_runs(tiny_shapes, tower, vlm, tmp_path,
                                                                                    monkeypatch, capsys):
    config = tmp_path / "vqa.yaml"
    config.write_text(yaml.safe_dump(tiny_config("vqa", tiny_shapes, tmp_path / "unused", eval_samples=2)))
    out = tmp_path / "report"
    command = ["experiment", "data-efficiency", "--config", str(config), "--out", str(out), "--fractions", "0.5,1",
               "--steps", "2", "--tower", str(tower), "--vlm", str(vlm), "--eval-samples", "4", "--quiet"]
    assert main(command) == 0
    summary = summary_of(capsys.readouterr().out)
    variants = ["from scratch", "pretrained tower", "LoRA VLM"]
    assert sorted(summary["overall"]) == sorted(variants)
    assert all(set(v) == {"0.5", "1"} for v in summary["overall"].values())
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6 and results["test_questions"] == 4 * 12
    half, whole = results["data"]
    assert whole["images"] == 48 and whole["questions"] == 48 * 12
    assert 0 < half["images"] < 48 and half["questions"] == half["images"] * 12
    assert half["images"] == len(train_images(tiny_shapes, 0.5))
    for row in results["runs"]:
        assert row["steps"] == 2 and 0 <= row["test"]["overall"] <= 100 and row["test"]["perQuestionType"]
        assert (out / "runs" / row["variant"].replace(" ", "_") / f"{row['fraction']:g}" / "model").is_dir()
    # the variants are the recipe with a tower, and the VLM with LoRA on the recipe's questions
    towered = yaml.safe_load((out / "runs" / "pretrained_tower" / "1" / "config.yaml").read_text())
    assert towered["task"] == "vqa" and towered["task_options"]["vision_from"] == str(tower)
    lora = yaml.safe_load((out / "runs" / "LoRA_VLM" / "0.5" / "config.yaml").read_text())
    assert lora["task"] == "vlm" and lora["task_options"]["init_from"] == str(vlm)
    assert lora["task_options"]["lora"]["rank"] == 8 and lora["data"]["train"]["captions"] is None
    assert lora["data"]["train_fraction"] == 0.5 and lora["train"]["steps"] == 2
    report = (out / "report.md").read_text()
    assert f"| 50% | {half['images']} | {half['questions']} |" in report
    assert all(f"| {v} " in report for v in variants)
    assert (out / "accuracy_vs_data.png").read_bytes().startswith(b"\x89PNG")

    # a rerun trains only what results.json does not record: here, a run "interrupted" after its folder appeared
    calls = []

    def counting_train(config, **kwargs):
        calls.append(config.output)
        return train(config, **kwargs)

    monkeypatch.setattr(data_efficiency, "train", counting_train)
    results["runs"] = [r for r in results["runs"] if not (r["variant"] == "from scratch" and r["fraction"] == 1.0)]
    (out / "results.json").write_text(json.dumps(results))
    interrupted = out / "runs" / "from_scratch" / "1"
    (interrupted / "model").rename(interrupted / "half-written")
    assert main(command) == 0
    assert calls == [str(interrupted)]
    assert not (interrupted / "half-written").exists() and (interrupted / "model").is_dir()
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 6
    assert summary_of(capsys.readouterr().out)["overall"].keys() == summary["overall"].keys()


def test_wrong_fractions_and_steps_are_refused_naming_the_flag(tiny_shapes, tmp_path, capsys):
    config = tmp_path / "vqa.yaml"
    config.write_text(yaml.safe_dump(tiny_config("vqa", tiny_shapes, tmp_path / "unused")))
    for flags, flag in ((["--fractions", "0.1,x"], "--fractions"), (["--fractions", "0,1"], "--fractions"),
                        (["--steps", "0"], "--steps")):
        assert main(["experiment", "data-efficiency", "--config", str(config), "--out", str(tmp_path / "o"), *flags]) == 2
        assert flag in capsys.readouterr().err
