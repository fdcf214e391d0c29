"""What both experiments read and score: a split's question files alone, and VQA accuracy on them."""

from __future__ import annotations

from ..data.splits import DataConfig, ImageStore, SplitData, SplitFiles, load_split, split_files
from ..evaluate.harness import evaluate_vqa, first_images


def questions_only(data: DataConfig, which: str) -> SplitFiles:
    """The question files of the 'train' or 'eval' split (paths resolved), without its captions or dialogues."""
    files = split_files(data, which)
    return SplitFiles(images=files.images, vqa_questions=files.vqa_questions, vqa_annotations=files.vqa_annotations,
                      table=files.table)


def split_questions(root: str, split: str) -> SplitFiles:
    """The question files of the split named `split` in the dataset.json of `root`."""
    return questions_only(DataConfig(root=root, eval_split=split), "eval")


def scored_questions(root: str, split: str, limit: int) -> SplitData:
    """The questions about the first `limit` images of a split of the dataset folder `root`."""
    files = split_questions(root, split)
    if not (files.vqa_questions or files.table):
        raise ValueError(f"the {split} split of {root} has no questions to score")
    test = first_images(load_split(DataConfig(eval=files), "eval"), limit)
    if not test.vqa:
        raise ValueError(f"the {split} split of {root} has no questions to score")
    return test


def vqa_scores(model, test: SplitData) -> dict:
    """VQA accuracy, overall and per question type, of `model` on the test questions."""
    store = ImageStore([r.image for r in test.vqa], model.image_processor, progress=False)
    scores = evaluate_vqa(model, test.vqa, store)
    return {"overall": scores["overall"], "perQuestionType": scores["perQuestionType"]}
