"""int8 quantization and the ONNX export / runtime: the same answers as float32, within stated tolerances."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multimodal_models.models.quantize import PatchLinear, quantize, quantized_linear_count

from .test_dual_encoder import random_images, tiny_model


def test_a_patch_convolution_is_the_same_linear_map():
    conv = nn.Conv2d(3, 16, 8, stride=8)
    pixels = torch.randn(2, 3, 32, 40)
    torch.testing.assert_close(PatchLinear(conv)(pixels), conv(pixels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_int8_dual_encoder_embeds_within_cosine_0_99_of_float32(loss):
    """Tiny random towers are the hard case (no outliers smoothed by training); real ViT-B/32-shaped
    towers stay above 0.999 (benchmarks/quantization.py)."""
    model = tiny_model(loss)
    images, texts = random_images(6, seed=1), ["a red circle", "two blue squares", "a star", "nothing"]
    reference_images, reference_texts = model.embed_images(images), model.embed_texts(texts)
    quantized = quantize(copy.deepcopy(model))
    assert quantized_linear_count(quantized) >= 10
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == m.stride for m in quantized.modules())
    assert F.cosine_similarity(quantized.embed_images(images), reference_images).min() > 0.99
    assert F.cosine_similarity(quantized.embed_texts(texts), reference_texts).min() > 0.99


def test_int8_vlm_answers_as_float32():
    """shapes-vlm in int8: the greedy answers of float32 on Shapes test questions, nearly all of them."""
    from multimodal_models import load
    from multimodal_models.shapes.generate import ShapesConfig, generate

    model = load("shapes-vlm")
    quantized = quantize(load("shapes-vlm"))
    assert quantized_linear_count(quantized) > 20
    questions = ["what color is the circle?", "how many objects are there?", "is there a star?",
                 "what shape is the red object?", "what size is the square?"]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        generate(ShapesConfig(seed=5, train=0, val=0, test=4, test_compositional=0), Path(tmp), progress=False)
        images = sorted(Path(tmp).glob("images/test/*.png"))
        pairs = [(image, q) for image in images for q in questions]
        same = sum(model.ask(str(i), q) == quantized.ask(str(i), q) for i, q in pairs)
    assert same >= 0.9 * len(pairs), f"{same} of {len(pairs)} answers unchanged"


def test_quantize_frees_the_float32_weights_it_replaces():
    import weakref

    model = tiny_model()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = [weakref.ref(m.weight) for m in linears]
    del linears
    quantize(model)
    assert all(w() is None for w in weights), "float32 weights of quantized layers are still alive"


def test_quantize_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="float32"):
        quantize(tiny_model().to(torch.bfloat16))
    with pytest.raises(ValueError, match="expected one of int8"):
        quantize(tiny_model(), "int4")


def test_an_int8_model_is_not_saved_but_loads_quantized(tmp_path):
    from multimodal_models import load

    folder = tiny_model().save_pretrained(tmp_path / "model")
    quantized = load(folder, quantize="int8")
    assert quantized.quantized == "int8" and quantized_linear_count(quantized) >= 10
    with pytest.raises(ValueError, match="save the float32 model"):
        quantized.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="quantize the graphs when exporting"):
        load(folder, quantize="int8", runtime="onnx")


# --- ONNX -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime (pip install onnxruntime)")
    from multimodal_models.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_model(), folder / "fp32")
    export_onnx(tiny_model(), folder / "int8", quantize="int8")
    return folder


def test_onnx_export_embeds_as_pytorch(exported):
    from multimodal_models import load
    from multimodal_models.export.onnx import use_onnx

    info = json.loads((exported / "fp32/onnx/export.json").read_text())
    assert info["graphs"]["text"]["inputs"] == ["ids", "attention_mask"] and info["quantize"] is None
    model = tiny_model()
    onnx_model = use_onnx(load(exported / "fp32"), exported / "fp32")
    assert onnx_model.runtime == "onnx"
    for count in (1, 5):  # batch size is dynamic
        images = random_images(count, seed=count)
        torch.testing.assert_close(onnx_model.embed_images(images), model.embed_images(images), atol=1e-5, rtol=0)
    texts = ["a", "a red circle left of a blue square", "two stars"]  # and so is the length
    torch.testing.assert_close(onnx_model.embed_texts(texts), model.embed_texts(texts), atol=1e-5, rtol=0)
    torch.testing.assert_close(onnx_model.embed_texts(texts[:1]), model.embed_texts(texts[:1]), atol=1e-5, rtol=0)
    labels = ["red", "blue", "green"]
    expected = model.classify(random_images(1)[0], labels)
    assert [p for _, p in onnx_model.classify(random_images(1)[0], labels)] == pytest.approx(
        [p for _, p in expected], abs=1e-5)


def test_onnx_int8_export_stays_close(exported):
    from multimodal_models import load
    from multimodal_models.export.onnx import use_onnx

    model = tiny_model()
    onnx_model = use_onnx(load(exported / "int8"), exported / "int8")
    images, texts = random_images(4, seed=9), ["a red circle", "a blue star"]
    assert F.cosine_similarity(onnx_model.embed_images(images), model.embed_images(images)).min() > 0.99
    assert F.cosine_similarity(onnx_model.embed_texts(texts), model.embed_texts(texts)).min() > 0.99


def test_a_folder_without_an_export_says_how_to_make_one(tmp_path):
    from multimodal_models import load
    from multimodal_models.export.onnx import use_onnx

    folder = tiny_model().save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="multimodal export MODEL .* --format onnx"):
        use_onnx(load(folder), folder)
