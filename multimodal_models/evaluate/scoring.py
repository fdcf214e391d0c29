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


def score_mmmu_files(
    predictions: str | Path, data: str | Path, *, split: str | None = "validation", seed: int = 42,
    allow_missing: bool = False,
) -> dict:
    """MMMU accuracy of a predictions file against MMMU parquet data: a file, or a folder in
    MMMU's published layout (one folder per subject, or the top folder with all of them),
    of which the files of `split` are read (see formats.read_mmmu).

    Every record read needs a response, unless allow_missing: then the records without one
    are left out and counted in "missing". The output also names the "split" read (None for
    a file).
    """
    responses = read_mmmu_predictions(predictions)
    records = formats.read_mmmu(data, split=split)
    split_read = split if Path(data).is_dir() else None
    missing = [record.id for record in records if record.id not in responses]
    if missing and not allow_missing:
        shown = ", ".join(repr(i) for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        of_split = f" (split {split_read!r})" if split_read else ""
        raise DataFormatError(
            predictions,
            f"no response for {len(missing)} of the {len(records)} record(s) of {data}{of_split}: {shown}; "
            "pass --allow-missing (allow_missing=True) to score the answered ones and count the others as missing",
        )
    scores = mmmu_scores(responses, records, seed=seed, require_all=False)
    scores.pop("predictions", None)
    return {**scores, "split": split_read}
