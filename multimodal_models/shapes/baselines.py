"""Model-free baselines, written as predictions files any scorer reads.

They are the floor every model must clear: a VQA model no better than `blind` ignores the
image; a captioner no better than `frequent caption` says the same thing of every image.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..data import formats
from ..data.records import VQARecord
from ..evaluate.metrics.vqa import vqa_accuracy
from .generate import load_manifest
from .stats import BlindBaseline, majority
from ..io import atomic_write_json


def _split_path(data: str | Path, split: str, key: str) -> Path:
    manifest = load_manifest(data)
    if split not in manifest["splits"]:
        raise ValueError(f"{data}/dataset.json has no split '{split}' (it has {sorted(manifest['splits'])})")
    return Path(data) / manifest["splits"][split][key]


def blind_vqa_predictions(data: str | Path, split: str, out: str | Path) -> Path:
    """Answer each question from its text alone, with priors fitted on the train split."""
    train = formats.read_vqa(_split_path(data, "train", "vqa_questions"), _split_path(data, "train", "vqa_annotations"),
                             image_dir=_split_path(data, "train", "images"))
    baseline = BlindBaseline((r.question, r.question_type, r.answer) for r in train)
    target = formats.read_vqa(_split_path(data, split, "vqa_questions"), None, image_dir=_split_path(data, split, "images"))
    predictions = [{"question_id": r.question_id, "answer": baseline.predict(r.question, r.question_type)} for r in target]
    atomic_write_json(out, predictions)
    return Path(out)


def blind_scores(train: list[VQARecord], test: list[VQARecord]) -> dict:
    """VQA accuracy, overall and per question type, of answering the test questions from their text alone,
    with priors fitted on these training questions."""
    baseline = BlindBaseline((r.question, r.question_type, r.answer or (r.answers[0] if r.answers else ""))
                             for r in train)
    accuracy = vqa_accuracy({r.question_id: baseline.predict(r.question, r.question_type) for r in test}, test)
    return {"overall": accuracy["overall"], "perQuestionType": accuracy["perQuestionType"]}


def frequent_caption_predictions(data: str | Path, split: str, out: str | Path) -> Path:
    """The most frequent train caption, for every image of the split."""
    train = formats.read_coco_captions(_split_path(data, "train", "captions"), image_dir=_split_path(data, "train", "images"))
    caption = majority(Counter(c for r in train for c in r.captions))
    target = formats.read_coco_captions(_split_path(data, split, "captions"), image_dir=_split_path(data, split, "images"))
    atomic_write_json(out, [{"image_id": r.image_id, "caption": caption} for r in target])
    return Path(out)
