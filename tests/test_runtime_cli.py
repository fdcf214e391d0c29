"""`multimodal export --format onnx`, then --runtime onnx and --quantize int8 through the commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from multimodal_models.cli import main

from .test_dual_encoder import random_images, tiny_model


def test_export_then_embed_index_and_search_with_onnx_runtime_and_int8(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="--runtime onnx needs onnxruntime (pip install onnxruntime)")
    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    assert main(["export", str(model_dir), str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"onnx/image_encoder.onnx", "onnx/text_encoder.onnx", "config.json"} <= set(report["files"])

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(random_images(4, seed=2)):
        image.save(photos / f"{i}.png")
    vectors = {}
    for name, flags in (("torch", ["--model", str(model_dir)]),
                        ("onnx", ["--model", str(tmp_path / "onnx"), "--runtime", "onnx"]),
                        ("int8", ["--model", str(model_dir), "--quantize", "int8"])):
        out = tmp_path / f"{name}.npy"
        assert main(["embed", "--images", *map(str, sorted(photos.glob("*.png"))), "--out", str(out), *flags]) == 0
        vectors[name] = np.load(out)
    capsys.readouterr()
    assert np.abs(vectors["onnx"] - vectors["torch"]).max() < 1e-5
    cosine = (vectors["int8"] * vectors["torch"]).sum(-1)  # unit vectors
    assert cosine.min() > 0.99 and np.abs(vectors["int8"] - vectors["torch"]).max() > 0  # close, and int8 indeed

    # an index built by ONNX Runtime is searched by it; an int8 index remembers it is int8
    assert main(["index", str(photos), "--model", str(tmp_path / "onnx"), "--runtime", "onnx", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(photos), "--image", str(photos / "2.png"), "-k", "1", "--json", "--runtime", "onnx"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["path"] == "2.png" and hit["score"] == pytest.approx(1.0, abs=1e-4)
    int8_index = tmp_path / "int8-index"
    assert main(["index", str(photos), "--model", str(model_dir), "--quantize", "int8", "--out", str(int8_index),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(int8_index), "--image", str(photos / "1.png"), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == "1.png"

    # what cannot work is refused with the way out
    assert main(["embed", "--texts", "a", "--model", str(model_dir), "--runtime", "onnx"]) == 2
    assert "--format onnx" in capsys.readouterr().err
    assert main(["export", "shapes-vlm", str(tmp_path / "vlm"), "--format", "onnx"]) == 2
    assert "dual encoders" in capsys.readouterr().err
