"""--device and --dtype: one resolution (devices.py), on every command that loads a model."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from multimodal_models.cli import build_parser, main
from multimodal_models.devices import available_devices, resolve_device, resolve_dtype

MODEL_COMMANDS = ["caption", "ask", "chat", "classify", "embed", "evaluate", "index", "search", "serve"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_loads_a_model_takes_device_and_dtype(command):
    options = {o for a in _subparsers(build_parser())[command]._actions for o in a.option_strings}
    assert {"--device", "--dtype"} <= options, command


def test_train_takes_device_and_passes_it_to_the_config():
    options = {o for a in _subparsers(build_parser())["train"]._actions for o in a.option_strings}
    assert "--device" in options


def test_device_names_resolve_and_a_missing_device_names_those_present():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device(available_devices()[0])
    assert available_devices()[-1] == "cpu"
    for wrong in ("gpu", "cuda:x", "mps:1", "tpu"):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N, mps or auto"):
            resolve_device(wrong)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no such GPU \(available: .*cpu\)"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="no such GPU"):
            resolve_device("cuda:3")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        resolve_dtype("int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_missing_device_is_a_one_line_error(tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    assert main(["classify", str(image), "--labels", "a,b", "--device", "cuda"]) == 2
    assert "no such GPU (available: " in capsys.readouterr().err


def test_load_honours_device_and_dtype():
    from multimodal_models import load

    model = load("shapes-clip", device="auto", dtype="bfloat16")
    parameters = list(model.parameters())
    assert {p.dtype for p in parameters} == {torch.bfloat16}
    assert {p.device for p in parameters} == {resolve_device("auto")}


def test_train_device_is_validated_with_the_config():
    from multimodal_models.errors import DataFormatError
    from multimodal_models.training.config import config_from_raw

    raw = {"task": "contrastive", "data": {"root": "data"}, "model": {}}
    assert config_from_raw({**raw, "train": {"device": "cuda:1"}}).train.device == "cuda:1"
    with pytest.raises(DataFormatError, match="train.device"):
        config_from_raw({**raw, "train": {"device": "gpu"}})


def test_an_index_remembers_its_dtype_and_search_uses_it(tmp_path, capsys):
    from tests.test_dual_encoder import random_images, tiny_model

    torch.set_num_threads(1)
    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(random_images(3, seed=5)):
        image.save(folder / f"{i}.png")
    assert main(["index", str(folder), "--model", str(model_dir), "--dtype", "bfloat16", "--device", "cpu",
                 "--quiet"]) == 0
    capsys.readouterr()
    from multimodal_models.index.image_index import ImageIndex

    with ImageIndex.open(folder) as index:
        assert index.info["model_dtype"] == "bfloat16"
    # no --dtype: the index's own; the image finds itself with cosine 1
    assert main(["search", str(folder), "--image", str(folder / "1.png"), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["path"] == "1.png" and hit["score"] == pytest.approx(1.0, abs=1e-3)
    # another dtype embeds with other weights: refused, saying which dtype to pass
    assert main(["search", str(folder), "a red circle", "--dtype", "float32"]) == 2
    assert "pass --dtype bfloat16" in capsys.readouterr().err
