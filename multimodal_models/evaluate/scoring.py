"""Score anyone's predictions files against benchmark annotations (the `multimodal score` commands).

Predictions come in the standard result formats, so the output of any model can be
scored, ours or not: COCO captions `[{"image_id", "caption"}]`, VQA `[{"question_id",
"answer"}]`, MMMU `{id: response}`.
"""

from __future__ import annotations

from pathlib import Path

from ..data import formats
from ..errors import DataFormatError
from .metrics.caption import caption_metrics
from .metrics.mmmu import mmmu_scores, read_mmmu_predictions
from .metrics.vqa import vqa_accuracy


def score_caption_files(predictions: str | Path, annotations: str | Path, *, tokenizer: str = "auto") -> dict:
    results = formats.read_caption_results(predictions)
    references = {r.image_id: list(r.captions) for r in formats.read_coco_captions(annotations, image_dir=".")}
    missing = [i for i in results if i not in references]
    if missing:
        raise DataFormatError(predictions, f"{len(missing)} image ids are not in {annotations}, e.g. {missing[:5]}")
    return caption_metrics(results, {i: references[i] for i in results}, tokenizer=tokenizer)


def score_vqa_files(predictions: str | Path, questions: str | Path, annotations: str | Path) -> dict:
    results = formats.read_vqa_results(predictions)
    records = formats.read_vqa(questions, annotations, image_dir=".")
    scores = vqa_accuracy(results, records)
    scores.pop("perQuestion", None)
    return scores


def score_mmmu_files(predictions: str | Path, data: str | Path, *, seed: int = 42) -> dict:
    responses = read_mmmu_predictions(predictions)
    records = formats.read_mmmu(data)
    scores = mmmu_scores(responses, records, seed=seed)
    scores.pop("predictions", None)
    return scores
