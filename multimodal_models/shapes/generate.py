"""Write the Shapes benchmark to disk in the layouts of the real datasets.

    OUT/
      dataset.json                        manifest: which file holds what, per split
      stats.json                          counts, answer balance, blind baselines
      images/<split>/shapes_<split>_<12-digit id>.png
      scenes/<split>_scenes.json          scene graphs (CLEVR-like: objects, boxes, relations)
      annotations/captions_<split>.json   COCO captions layout
      annotations/karpathy_shapes.json    Karpathy split layout (all splits in one file)
      vqa/shapes_<split>_questions.json   VQA v2 questions layout
      vqa/shapes_<split>_annotations.json VQA v2 annotations layout (10 answers each)
      dialogues/<split>.json              LLaVA conversation layout
      mmmu/Shapes/<split>-00000-of-00001.parquet  MMMU layout (evaluation splits)

Every image is generated from its own random stream, seeded by (seed, split, index), so
the output does not depend on how many processes share the work, and the same seed
writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..io import atomic_write_bytes, atomic_write_json
from .language import make_captions
from .layout import write_layouts
from .stats import compute_stats
from .questions import SUBFIELDS, make_dialogue, make_multiple_choice, make_questions
from .world import COLORS, MAX_IMAGE_SIZE, SHAPES, render_scene, sample_scene

SPLITS = ("train", "val", "test", "test_compositional")
EVAL_SPLITS = ("val", "test", "test_compositional")  # MMMU-style items are written for these
# (colour, shape) pairs that never appear in train/val/test (not even in the text) and
# appear in every image of test_compositional: one pair per shape.
HELD_OUT_COMBOS = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "star"), ("yellow", "square"), ("purple", "hexagon"), ("white", "diamond")}
)
VERSION = "1.0"


@dataclass(frozen=True)
class ShapesConfig:
    seed: int = 0
    train: int = 10_000
    val: int = 1_000
    test: int = 1_000
    test_compositional: int = 1_000
    image_size: int = 64
    hard: bool = False  # colour jitter, rotation and textured backgrounds
    captions_per_image: int = 5
    questions_per_image: int = 12
    multiple_choice_per_image: int = 2

    def count(self, split: str) -> int:
        return getattr(self, split)

    def validate(self) -> None:
        if not 16 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"--image-size must be between 16 and {MAX_IMAGE_SIZE}, got {self.image_size}")
        for split in SPLITS:
            if not 0 <= self.count(split) <= 9_999_999:
                raise ValueError(f"--{split.replace('_', '-')} must be between 0 and 9999999, got {self.count(split)}")
        if self.questions_per_image < 1 or self.captions_per_image < 1:
            raise ValueError("at least one caption and one question per image are needed")


def image_id(split: str, index: int) -> int:
    """Ids are unique across splits, as in COCO: train 10000001.., val 20000001.., ..."""
    return (SPLITS.index(split) + 1) * 10_000_000 + index + 1


def image_file_name(split: str, index: int) -> str:
    return f"shapes_{split}_{image_id(split, index):012d}.png"


def generate_image(config: ShapesConfig, split: str, index: int, out: Path | None) -> dict:
    """Everything about one image; the PNG is written under `out` when given."""
    rng = random.Random(f"shapes/{config.seed}/{split}/{index}")
    compositional = split == "test_compositional"
    all_combos = {(c, s) for c in COLORS for s in SHAPES}
    scene = sample_scene(
        rng,
        allowed_combos=all_combos if compositional else all_combos - HELD_OUT_COMBOS,
        required_combos=set(HELD_OUT_COMBOS) if compositional else None,
        hard=config.hard,
    )
    forbidden = frozenset() if compositional else HELD_OUT_COMBOS
    png = io.BytesIO()
    render_scene(scene, config.image_size).save(png, format="PNG")
    if out is not None:
        atomic_write_bytes(out / "images" / split / image_file_name(split, index), png.getvalue())
    captions = make_captions(scene, rng, config.captions_per_image)
    questions = make_questions(scene, rng, config.questions_per_image, forbidden)
    dialogue = make_dialogue(scene, rng, forbidden)
    choices = []
    if split in EVAL_SPLITS:
        for q in rng.sample(questions, min(config.multiple_choice_per_image, len(questions))):
            text, options, letter = make_multiple_choice(q, rng)
            choices.append({"question": text, "options": options, "answer": letter, "subfield": SUBFIELDS[q.question_type]})
    return {
        "index": index,
        "image_id": image_id(split, index),
        "file_name": image_file_name(split, index),
        "objects": [o.to_json(config.image_size) for o in scene.objects],
        "captions": captions,
        "questions": [asdict(q) for q in questions],
        "dialogue": dialogue,
        "multiple_choice": choices,
        "png": png.getvalue() if choices else None,  # MMMU embeds image bytes
    }


def _generate_chunk(args: tuple) -> list[dict]:
    config, split, start, stop, out = args
    return [generate_image(config, split, i, out) for i in range(start, stop)]


def generate(config: ShapesConfig, out: str | Path, *, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the whole benchmark under `out`; returns the statistics written to stats.json."""
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 4)
    per_split: dict[str, list[dict]] = {}
    total = sum(config.count(s) for s in SPLITS)
    bar = tqdm(total=total, desc="shapes", unit="img", disable=not progress)
    chunk = 250
    jobs = [
        (config, split, start, min(start + chunk, config.count(split)), out)
        for split in SPLITS
        for start in range(0, config.count(split), chunk)
    ]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    results: dict[tuple[str, int], list[dict]] = {}
    if workers > 1 and len(jobs) > 1:
        with context.Pool(workers) as pool:
            for job, items in zip(jobs, pool.imap(_generate_chunk, jobs)):
                results[(job[1], job[2])] = items
                bar.update(len(items))
    else:
        for job in jobs:
            results[(job[1], job[2])] = _generate_chunk(job)
            bar.update(len(results[(job[1], job[2])]))
    bar.close()
    for split in SPLITS:
        per_split[split] = [item for start in range(0, config.count(split), chunk) for item in results[(split, start)]]

    files = write_layouts(out, config, per_split)
    stats = compute_stats(config, per_split)
    atomic_write_json(out / "stats.json", stats, indent=2)
    manifest = {
        "name": "shapes",
        "version": VERSION,
        "config": asdict(config),
        "held_out_combos": sorted(list(c) for c in HELD_OUT_COMBOS),
        "splits": files,
        "karpathy": "annotations/karpathy_shapes.json",
        "stats": "stats.json",
    }
    atomic_write_json(out / "dataset.json", manifest, indent=2)  # written last: its presence marks a complete dataset
    return stats


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a dataset written by 'multimodal shapes generate'?")
    return json.loads(path.read_text())
