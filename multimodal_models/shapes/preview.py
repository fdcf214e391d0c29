"""A picture of a dataset: a grid of samples, each with a caption and a few Q/A pairs."""

from __future__ import annotations

import random
import textwrap
from collections import defaultdict
from pathlib import Path

from ..io import atomic_write_figure
from ..data import formats
from ..data.images import load_image
from .generate import load_manifest


def draw_preview(data: str | Path, out: str | Path, *, split: str = "val", count: int = 12, seed: int = 0,
                 qa_per_image: int = 3, columns: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = Path(data)
    files = load_manifest(data)["splits"].get(split)
    if files is None:
        raise ValueError(f"{data}/dataset.json has no split '{split}'")
    captions = formats.read_coco_captions(data / files["captions"], image_dir=data / files["images"])
    questions = formats.read_vqa(data / files["vqa_questions"], data / files["vqa_annotations"], image_dir=data / files["images"])
    qa = defaultdict(list)
    for q in questions:
        qa[q.image_id].append(q)
    if not captions:
        raise ValueError(f"split '{split}' of {data} has no images")
    rng = random.Random(seed)
    samples = rng.sample(captions, min(count, len(captions)))
    rows = (len(samples) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, samples):
        ax.imshow(load_image(record.image), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(record.captions[0], 38)), fontsize=8)
        lines = [f"Q: {q.question}\nA: {q.answer}" for q in rng.sample(qa[record.image_id], min(qa_per_image, len(qa[record.image_id])))]
        ax.text(0.0, -0.04, "\n".join("\n".join(textwrap.wrap(x, 44)) for x in lines), transform=ax.transAxes,
                va="top", fontsize=7, family="monospace")
    fig.suptitle(f"Shapes benchmark: {split} split ({len(captions)} images)", fontsize=12)
    atomic_write_figure(out, fig)
    return Path(out)
