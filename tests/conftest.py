"""Shared fixtures: a tiny Shapes benchmark and tiny configs of each task, so training tests take seconds."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from multimodal_models.shapes.generate import ShapesConfig, generate

torch.set_num_threads(1)

TINY_VISION = {"image_size": 64, "patch_size": 16, "width": 32, "depth": 1, "heads": 2, "stem": "conv", "pool": "mean",
               "class_token": False}
TINY_TEXT = {"max_length": 32, "width": 32, "depth": 1, "heads": 2}
TINY_MODELS = {
    "vlm": {"vision": TINY_VISION, "decoder": {"width": 32, "depth": 2, "heads": 2, "max_length": 96}, "pixel_shuffle": 2},
    "contrastive": {"vision": TINY_VISION, "text": TINY_TEXT, "embed_dim": 32},
    "vqa": {"vision": TINY_VISION, "text": TINY_TEXT, "fusion": {"kind": "middle", "width": 32, "depth": 1, "heads": 2},
            "hidden": 64},
}
# the Shapes world's tasks train the same models, extended (multimodal_models.shapes)
TINY_MODELS["shapes-vlm"] = TINY_MODELS["vlm"]
TINY_MODELS["shapes-contrastive"] = TINY_MODELS["contrastive"]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_shapes")
    generate(ShapesConfig(seed=11, train=48, val=8, test=8, test_compositional=8), out, workers=1, progress=False)
    return out


def tiny_config(task: str, data, output, **train) -> dict:
    """A raw run config (as YAML would give it) for a few-second training run."""
    settings = {"steps": 6, "batch_size": 8, "lr": 0.003, "warmup": 2, "eval_every": 6, "eval_samples": 4,
                "save_every": 3, "log_every": 2, "seed": 0}
    settings.update(train)
    return {"task": task, "data": {"root": str(data)}, "model": TINY_MODELS[task], "train": settings, "output": str(output)}


def require_program(name: str, why: str) -> str:
    """The path of a system program; skip (on a laptop) or fail (in CI) when it is missing."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"'{name}' is not installed ({why}); CI must install it (see .ci/run)")
        pytest.skip(reason=f"'{name}' is not installed ({why})")
    return path
