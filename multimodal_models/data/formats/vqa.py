"""VQA v2 (questions + annotations, images found by id) and VQA results.

  VQA v2 questions+annotations .. read_vqa / write_vqa (write_vqa_questions, write_vqa_annotations)
  VQA results ................... read_vqa_results / write_vqa_results
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from multimodal_models.data.records import VQARecord
from multimodal_models.errors import DataFormatError

from ._common import (
    _DEFAULT_INFO,
    _MAX_LISTED,
    PathLike,
    _get,
    _grounding_json,
    _load_json,
    _nested_objects,
    _objects,
    _read_grounding,
    _read_results,
    _require_images_exist,
    _require_int_id,
    _top_level,
    _write_json,
    _write_results,
)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
_TRAILING_NUMBER = re.compile(r"(\d+)$")


# =========================================================================================
# Finding an image by its id
# =========================================================================================


class _ImagesById:
    """Finds the image file of an integer image id in one folder.

    First the COCO name `COCO_<data_subtype>_<id:012d>.jpg`; otherwise any image file whose
    name (without extension) ends with the id, zero-padded or not: "val2014_000000000042.png",
    "42.jpg". The folder is listed once, on first need.
    """

    def __init__(self, image_dir: Path, data_subtype: str | None):
        self.image_dir = image_dir
        self.data_subtype = data_subtype
        self._by_number: dict[int, list[Path]] | None = None
        self._found: dict[int, list[Path]] = {}  # image id -> candidates, so each id is looked up once

    def expected_path(self, image_id: int) -> Path:
        """Where the image would be under COCO's naming (used to report a missing image)."""
        if self.data_subtype:
            return self.image_dir / f"COCO_{self.data_subtype}_{image_id:012d}.jpg"
        return self.image_dir / f"{image_id:012d}.jpg"

    def candidates(self, image_id: int) -> list[Path]:
        """Existing files for `image_id` (several only when the folder is ambiguous)."""
        if image_id not in self._found:
            self._found[image_id] = self._look_up(image_id)
        return self._found[image_id]

    def _look_up(self, image_id: int) -> list[Path]:
        if self.data_subtype:
            coco_name = self.expected_path(image_id)
            if coco_name.is_file():
                return [coco_name]
        found = self._index().get(image_id, [])
        if len(found) > 1 and self.data_subtype:
            narrowed = [p for p in found if self.data_subtype in p.name]
            if len(narrowed) == 1:
                return narrowed
        return found

    def _index(self) -> dict[int, list[Path]]:
        if self._by_number is None:
            self._by_number = {}
            if self.image_dir.is_dir():
                for entry in sorted(os.scandir(self.image_dir), key=lambda e: e.name):
                    suffix = os.path.splitext(entry.name)[1].lower()
                    match = _TRAILING_NUMBER.search(os.path.splitext(entry.name)[0])
                    if match and suffix in _IMAGE_SUFFIXES and entry.is_file():
                        self._by_number.setdefault(int(match.group(1)), []).append(Path(entry.path))
        return self._by_number


def _vqa_image(file: Path, finder: _ImagesById, image_id: int, label: str) -> Path:
    """The image file of `image_id`, or the expected COCO path when there is none."""
    found = finder.candidates(image_id)
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:_MAX_LISTED])
        raise DataFormatError(
            file,
            f"image id {image_id} matches several files in {finder.image_dir}: {names}",
            record=label,
            field="image_id",
        )
    return found[0] if found else finder.expected_path(image_id)


# =========================================================================================
# Reading questions + annotations
# =========================================================================================


def read_vqa(
    questions_path: PathLike,
    annotations_path: PathLike | None = None,
    image_dir: PathLike | None = None,
    *,
    check_images: bool = False,
) -> list[VQARecord]:
    """Read VQA v2 questions (and, when given, their annotations) into VQARecords.

    Questions layout: {"info", "task_type", "data_type", "data_subtype", "license",
    "questions": [{"image_id", "question", "question_id"}]}. Annotations layout: {"info",
    "data_type", "data_subtype", "license", "annotations": [{"question_type",
    "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}],
    "image_id", "answer_type", "question_id"}]}; every question must have exactly one
    annotation with the same image_id.

    Images are looked up in `image_dir` (default: the questions file's folder) by image id:
    COCO's `COCO_<data_subtype>_<id:012d>.jpg`, else any image file whose name ends with
    the id (zero-padded or not). With `check_images`, an image not found is an error.
    """
    file = Path(questions_path)
    data = _top_level(
        file, _load_json(file), "object", 'VQA questions layout {"data_subtype": ..., "questions": [...]}'
    )
    data_subtype = _get(file, data, "data_subtype", "string", record=None, default=None)
    finder = _ImagesById(Path(image_dir) if image_dir is not None else file.parent, data_subtype)
    questions: dict[int, tuple[str, dict]] = {}
    for _, label, entry in _objects(file, data, "questions"):
        question_id = _get(file, entry, "question_id", "integer", record=label)
        if question_id in questions:
            raise DataFormatError(
                file,
                f"duplicate question_id {question_id} (also {questions[question_id][0]})",
                record=label,
                field="question_id",
            )
        label = f"{label} (question_id {question_id})"
        _get(file, entry, "image_id", "integer", record=label)
        _get(file, entry, "question", "string", record=label)
        questions[question_id] = (label, entry)
    annotations = _read_vqa_annotations(Path(annotations_path), questions) if annotations_path is not None else {}
    records, references = [], []
    for question_id, (label, entry) in questions.items():
        image_id = entry["image_id"]
        image = _vqa_image(file, finder, image_id, label)
        references.append((label, "image_id", image))
        records.append(_vqa_record(question_id, image_id, image, entry["question"], annotations.get(question_id)))
    if check_images:
        _require_images_exist(file, references)
    return records


def _read_vqa_annotations(file: Path, questions: Mapping[int, tuple[str, dict]]) -> dict[int, dict]:
    """Read and cross-check an annotations file against the questions, by question_id."""
    data = _top_level(file, _load_json(file), "object", 'VQA annotations layout {"annotations": [...]}')
    annotations: dict[int, dict] = {}
    for _, label, entry in _objects(file, data, "annotations"):
        question_id = _get(file, entry, "question_id", "integer", record=label)
        label = f"{label} (question_id {question_id})"
        if question_id not in questions:
            raise DataFormatError(
                file, f"question_id {question_id} is not in the questions file", record=label, field="question_id"
            )
        if question_id in annotations:
            raise DataFormatError(
                file, f"a second annotation for question_id {question_id}", record=label, field="question_id"
            )
        image_id = _get(file, entry, "image_id", "integer", record=label)
        question_image = questions[question_id][1]["image_id"]
        if image_id != question_image:
            raise DataFormatError(
                file,
                f"image_id {image_id} differs from the question's image_id {question_image}",
                record=label,
                field="image_id",
            )
        answers = tuple(
            _get(file, answer, "answer", "string", record=label, prefix=prefix)
            for prefix, answer in _nested_objects(file, entry, "answers", record=label)
        )
        annotations[question_id] = {
            "answers": answers,
            "answer": _get(file, entry, "multiple_choice_answer", "string", record=label),
            "answer_type": _get(file, entry, "answer_type", "string", record=label, default=None),
            "question_type": _get(file, entry, "question_type", "string", record=label, default=None),
            **_read_grounding(file, entry, record=label),
        }
    for question_id, (label, _) in questions.items():
        if question_id not in annotations:
            raise DataFormatError(
                file,
                f"no annotation for question_id {question_id} ({label} of the questions file)",
                field="annotations",
            )
    return annotations


def _vqa_record(question_id: int, image_id: int, image: Path, question: str, annotation: Mapping | None) -> VQARecord:
    """Assemble a VQARecord from a question and its (optional) annotation."""
    if annotation is None:
        return VQARecord(question_id=question_id, image_id=image_id, image=image, question=question)
    return VQARecord(question_id=question_id, image_id=image_id, image=image, question=question, **annotation)


# =========================================================================================
# Writing questions + annotations
# =========================================================================================


def write_vqa(
    questions_path: PathLike,
    annotations_path: PathLike | None,
    records: Iterable[VQARecord],
    *,
    data_subtype: str,
    data_type: str = "mscoco",
    task_type: str = "Open-Ended",
    info: Mapping[str, Any] | None = None,
    license: Mapping[str, Any] | None = None,
) -> None:
    """Write the questions file and (unless `annotations_path` is None) the annotations file."""
    records = list(records)
    write_vqa_questions(
        questions_path,
        records,
        data_subtype=data_subtype,
        data_type=data_type,
        task_type=task_type,
        info=info,
        license=license,
    )
    if annotations_path is not None:
        write_vqa_annotations(
            annotations_path, records, data_subtype=data_subtype, data_type=data_type, info=info, license=license
        )


def write_vqa_questions(
    path: PathLike,
    records: Iterable[VQARecord],
    *,
    data_subtype: str,
    data_type: str = "mscoco",
    task_type: str = "Open-Ended",
    info: Mapping[str, Any] | None = None,
    license: Mapping[str, Any] | None = None,
) -> Path:
    """Write a VQA v2 questions file (integer image and question ids).

    The images themselves are not written; name them so `read_vqa` finds them, e.g.
    `COCO_<data_subtype>_<id:012d>.jpg` or `<data_subtype>_<id:012d>.png`.
    """
    questions = []
    for index, record in enumerate(records):
        image_id, question_id = _vqa_ids(index, record)
        questions.append({"image_id": image_id, "question": record.question, "question_id": question_id})
    document = {**_vqa_header(data_subtype, data_type, info, license), "task_type": task_type, "questions": questions}
    return _write_json(path, document)


def write_vqa_annotations(
    path: PathLike,
    records: Iterable[VQARecord],
    *,
    data_subtype: str,
    data_type: str = "mscoco",
    info: Mapping[str, Any] | None = None,
    license: Mapping[str, Any] | None = None,
) -> Path:
    """Write a VQA v2 annotations file; every record needs its `answer`.

    Each human answer gets answer_confidence "yes" and answer_id 1..n; a missing
    answer_type is written as "other" and a missing question_type as "none of the above"
    (VQA v2's catch-all values).
    """
    annotations = []
    for index, record in enumerate(records):
        if record.answer is None:
            raise ValueError(f"{_vqa_what(index, record)}: no answer; VQA annotations need multiple_choice_answer")
        image_id, question_id = _vqa_ids(index, record)
        annotations.append(
            {
                "question_type": record.question_type or "none of the above",
                "multiple_choice_answer": record.answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": number}
                    for number, answer in enumerate(record.answers, start=1)
                ],
                "image_id": image_id,
                "answer_type": record.answer_type or "other",
                "question_id": question_id,
            }
            | _grounding_json(record)
        )
    return _write_json(path, {**_vqa_header(data_subtype, data_type, info, license), "annotations": annotations})


def _vqa_header(data_subtype: str, data_type: str, info: Mapping | None, license: Mapping | None) -> dict[str, Any]:
    """The fields that VQA questions and annotations files share."""
    return {
        "info": dict(info or _DEFAULT_INFO),
        "data_type": data_type,
        "data_subtype": data_subtype,
        "license": dict(license or {"name": "", "url": ""}),
    }


def _vqa_what(index: int, record: VQARecord) -> str:
    """How a record is named in a writer's error message."""
    return f"record {index} (question_id {record.question_id!r})"


def _vqa_ids(index: int, record: VQARecord) -> tuple[int, int]:
    """The record's (image_id, question_id), which VQA files need as integers."""
    what = _vqa_what(index, record)
    return (
        _require_int_id(record.image_id, what=what, format_name="VQA"),
        _require_int_id(record.question_id, what=what, format_name="VQA"),
    )


# =========================================================================================
# VQA results
# =========================================================================================


def read_vqa_results(path: PathLike) -> dict[int | str, str]:
    """Read VQA results [{"question_id", "answer"}] into {question_id: answer}; duplicates are errors."""
    return _read_results(path, "question_id", "answer", 'VQA results layout [{"question_id": ..., "answer": ...}]')


def write_vqa_results(path: PathLike, answers: Mapping[int | str, str]) -> Path:
    """Write {question_id: answer} as VQA results [{"question_id", "answer"}]."""
    return _write_results(path, answers, "question_id", "answer")
