"""A VQA recipe chosen from the data, for a config that names only the data.

    task: vqa
    data: {train: {table: questions.jsonl, images: photos/}, eval: {table: held_out.jsonl, images: photos/}}

A config without `model` gets one chosen here from the training split, said at the start of
the run: the image size from the images' sizes, the question length from the questions, a small
CNN encoder with FiLM fusion (the generic recipe that learned best in the fusion experiment; see
docs/generic-recipes.md). The train settings the config does not give follow: a schedule of
about `EPOCHS` passes over the images within `MAX_STEPS`. A config that gives `model` gives all of
it (the run's config.yaml, written at the start, shows the chosen one to start from).
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from ..data.records import ImageSource
from ..data.splits import SplitData, image_key

EPOCHS = 15  # passes over the training images that the schedule aims at
MIN_STEPS, MAX_STEPS = 200, 4000  # 4000 steps of 32 images: about 30 minutes on 2 CPU cores at 64 px
BATCH_IMAGES = 32
SIZES = (32, 48, 64, 96, 128)  # image sizes to choose from: beyond 128 px a CPU run gets slow
SAMPLE = 200  # images whose size is read to choose one


def image_side(sources: Iterable[ImageSource]) -> int:
    """The median shorter side of (a sample of) the images, as one of SIZES (the largest not above it)."""
    sides = []
    for source in list(sources)[:SAMPLE]:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:  # reads the header only
            sides.append(min(image.size))
    if not sides:
        return 64
    median = statistics.median(sides)
    return max([s for s in SIZES if s <= median] or [SIZES[0]])


def cnn_for(image_size: int) -> dict:
    """A full-resolution first stage, then stride-2 stages down to a grid of 8 to 15 cells a side (8 x 8 at
    32, 64 or 128 px; 12 x 12 at 48 or 96 px), then one more stage."""
    halvings = max(0, int(math.log2(image_size // 8)))
    channels = [32] + [64] * (halvings + 1)
    strides = [1] + [2] * halvings + [1]
    return {"image_size": image_size, "channels": channels, "strides": strides}


def vqa_recipe(split: SplitData, tokenize_length: Callable[[str], int], *, steps: int | None = None,
               batch_size: int | None = None) -> tuple[dict, dict]:
    """(model, train) settings for the vqa task chosen from the training split; tokenize_length(text)
    gives a question's length in tokens; steps / batch_size: those the config gives (the rest of the
    schedule follows them)."""
    images = {image_key(r.image): r.image for r in split.vqa}
    # the longest question with its two special tokens, and room for longer ones in the evaluation
    max_length = max(tokenize_length(r.question) for r in split.vqa) + 2 + 8
    size = image_side(images.values())
    model = {
        "encoder": "cnn",
        "cnn": cnn_for(size),
        "text": {"max_length": max_length, "width": 128, "depth": 2, "heads": 4, "causal": False, "pool": "mean"},
        "fusion": {"kind": "film", "width": 64, "depth": 4, "coordinates": True},
    }
    batch = batch_size or min(BATCH_IMAGES, len(images))
    steps = steps or min(MAX_STEPS, max(MIN_STEPS, round(EPOCHS * len(images) / batch)))
    train = {"steps": steps, "batch_size": batch, "lr": 2e-3, "warmup": max(1, min(100, steps // 10)),
             "eval_every": max(1, steps // 4), "save_every": max(1, steps // 8), "precision": "fp32"}
    return model, train
