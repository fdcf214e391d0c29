"""Readers and writers for the data formats people already have.

Every reader returns the record types of `multimodal_models.data.records`, never raw dicts,
and validates what it reads: a malformed file raises `DataFormatError` naming the file, the
record (index, and id where there is one) and the field, with what was expected, e.g.

    captions_val2014.json, record annotations[17] (id 48), field 'caption': expected a string, got null

Invalid JSON is reported with its line and column. Readers never open images: images are
referenced by path (or carried as bytes where the format embeds them, as MMMU does).
`check_images=True` verifies that every referenced file exists and names the missing ones.

Formats (one section each below):
  COCO captions JSON ............ read_coco_captions / write_coco_captions
  COCO caption results .......... read_caption_results / write_caption_results
  Karpathy split JSON ........... read_karpathy / write_karpathy   (dataset_coco.json, dataset_flickr30k.json)
  VQA v2 questions+annotations .. read_vqa / write_vqa (write_vqa_questions, write_vqa_annotations)
  VQA results ................... read_vqa_results / write_vqa_results
  LLaVA conversations ........... read_llava / write_llava
  MMMU parquet .................. read_mmmu / write_mmmu_parquet
  JSONL/CSV next to images ...... read_table / write_table

Writers create parent folders and replace the target file atomically (write, then rename).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from multimodal_models.data.images import read_image_size
from multimodal_models.data.records import (
    ROLES,
    CaptionRecord,
    ConversationRecord,
    ImageSource,
    MultipleChoiceRecord,
    Turn,
    VQARecord,
)
from multimodal_models.errors import DataFormatError
from multimodal_models.io import atomic_write_bytes, atomic_write_json, atomic_write_text

PathLike = str | os.PathLike

IMAGE_MARKER = "<image>"  # LLaVA's placeholder for one image in a turn's text
_MAX_LISTED = 5  # how many missing images an error message lists by name
_MISSING = object()


# =========================================================================================
# Shared helpers: reading JSON, checking fields, checking images, writing files
# =========================================================================================


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM tolerated); decoding errors name the byte offset."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text (byte offset {exc.start}: {exc.reason})") from None


def _load_json(path: Path) -> Any:
    """Parse a JSON file; syntax errors give the line and column."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _describe(value: Any) -> str:
    """How a JSON value is named in error messages ("null", "an integer (3)", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})" if value else "an empty string"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# kind -> (phrase used in messages, test)
_KINDS: dict[str, tuple[str, Any]] = {
    "string": ("a string", lambda v: isinstance(v, str)),
    "text": ("a non-empty string", lambda v: isinstance(v, str) and v != ""),
    "integer": ("an integer", _is_int),
    "id": ("an integer or a string", lambda v: _is_int(v) or (isinstance(v, str) and v != "")),
    "list": ("a list", lambda v: isinstance(v, list)),
    "object": ("an object", lambda v: isinstance(v, dict)),
}


def _check(file: Path, value: Any, kind: str, *, record: object, field: str | None) -> Any:
    """Return `value` if it is of `kind`, else raise a DataFormatError naming record and field."""
    phrase, test = _KINDS[kind]
    if not test(value):
        raise DataFormatError(file, f"expected {phrase}, got {_describe(value)}", record=record, field=field)
    return value


def _get(
    file: Path, obj: Mapping, key: str, kind: str, *, record: object, prefix: str = "", default: Any = _MISSING
) -> Any:
    """`obj[key]` checked against `kind`; a missing key is an error unless `default` is given."""
    field = prefix + key
    if key not in obj:
        if default is not _MISSING:
            return default
        raise DataFormatError(file, f"missing; expected {_KINDS[kind][0]}", record=record, field=field)
    return _check(file, obj[key], kind, record=record, field=field)


def _top_level(file: Path, data: Any, kind: str, layout: str) -> Any:
    """Check the type of the whole document, naming the expected layout."""
    phrase, test = _KINDS[kind]
    if not test(data):
        raise DataFormatError(file, f"expected {phrase} at the top level ({layout}), got {_describe(data)}")
    return data


def _objects(file: Path, container: Mapping, key: str) -> Iterator[tuple[int, str, dict]]:
    """Yield (index, "key[index]", entry) for a required list of objects `container[key]`."""
    entries = _get(file, container, key, "list", record=None)
    for index, entry in enumerate(entries):
        label = f"{key}[{index}]"
        _check(file, entry, "object", record=label, field=None)
        yield index, label, entry


def _require_images_exist(file: Path, references: Iterable[tuple[object, str, ImageSource]]) -> None:
    """Raise one DataFormatError listing every referenced image file that does not exist.

    `references` yields (record label, field name, image); bytes images are skipped.
    """
    missing: list[tuple[object, str, Path]] = []
    seen: dict[Path, bool] = {}
    for record, field, image in references:
        if isinstance(image, (bytes, bytearray)):
            continue
        path = Path(image)
        if path not in seen:
            seen[path] = path.is_file()
        if not seen[path]:
            missing.append((record, field, path))
    if not missing:
        return
    listed = "; ".join(f"{record}: {path}" for record, _, path in missing[:_MAX_LISTED])
    more = f"; and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    first_record, first_field, _ = missing[0]
    raise DataFormatError(
        file,
        f"{len(missing)} referenced image file(s) not found: {listed}{more}",
        record=first_record,
        field=first_field,
    )


def _write_json(path: PathLike, document: Any, *, indent: int | None = None) -> Path:
    """Write a JSON document atomically (UTF-8, non-ASCII kept as is) and return its path."""
    atomic_write_json(path, document, indent=indent)
    return Path(path)


def _relative_image(image: ImageSource, root: Path, *, what: str, format_name: str) -> str:
    """The path of `image` relative to `root` (POSIX separators), for writing into a file."""
    if isinstance(image, (bytes, bytearray)):
        raise ValueError(
            f"{what}: the image is in-memory bytes, but {format_name} files reference images by path; "
            "save the image under the image folder first"
        )
    absolute = Path(os.path.abspath(image))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        raise ValueError(f"{what}: image {image} is not inside the image folder {root}") from None


def _require_int_id(value: object, *, what: str, format_name: str) -> int:
    """Writers of COCO-family files need integer ids."""
    if not _is_int(value):
        raise ValueError(f"{what}: {format_name} needs integer ids, got {value!r}")
    return value  # type: ignore[return-value]


# =========================================================================================
# COCO captions (captions_train2014.json) and caption results
# =========================================================================================


def read_coco_captions(path: PathLike, image_dir: PathLike, *, check_images: bool = False) -> list[CaptionRecord]:
    """Read a COCO captions file into one CaptionRecord per image, in the order of images[].

    Layout: {"info", "licenses", "images": [{"id", "file_name", "width", "height", ...}],
    "annotations": [{"id", "image_id", "caption"}]}. Each record's image is
    `image_dir / file_name`; images with no annotation (a test split) get no captions.
    Captions are kept verbatim (COCO has a few with trailing spaces or newlines).
    """
    file = Path(path)
    data = _top_level(file, _load_json(file), "object", 'COCO captions layout {"images": [...], "annotations": [...]}')
    image_dir = Path(image_dir)
    file_names: dict[int, str] = {}
    first_seen: dict[int, str] = {}
    for _, label, entry in _objects(file, data, "images"):
        image_id = _get(file, entry, "id", "integer", record=label)
        if image_id in file_names:
            raise DataFormatError(
                file, f"duplicate image id {image_id} (also {first_seen[image_id]})", record=label, field="id"
            )
        file_names[image_id] = _get(file, entry, "file_name", "text", record=f"{label} (id {image_id})")
        first_seen[image_id] = label
    captions: dict[int, list[str]] = {image_id: [] for image_id in file_names}
    for _, label, entry in _objects(file, data, "annotations"):
        if _is_int(entry.get("id")):
            label = f"{label} (id {entry['id']})"
        image_id = _get(file, entry, "image_id", "integer", record=label)
        if image_id not in captions:
            raise DataFormatError(
                file, f"image id {image_id} is not listed in images[]", record=label, field="image_id"
            )
        captions[image_id].append(_get(file, entry, "caption", "string", record=label))
    records = [
        CaptionRecord(image_id=image_id, image=image_dir / name, captions=tuple(captions[image_id]))
        for image_id, name in file_names.items()
    ]
    if check_images:
        _require_images_exist(file, ((first_seen[r.image_id], "file_name", r.image) for r in records))
    return records


def write_coco_captions(
    path: PathLike,
    records: Iterable[CaptionRecord],
    *,
    image_dir: PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    description: str | None = None,
    info: Mapping[str, Any] | None = None,
    licenses: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write records as a COCO captions file (integer image ids).

    `file_name` is each image's path relative to `image_dir`, or, without `image_dir`,
    its bare file name (COCO's own convention: the folder is given to the reader).
    `width`/`height` are `image_size` for every image (an int for square images, or
    (width, height)), else read from each image file's header. `description` fills
    info["description"]. Annotation ids are numbered from 1 in order.
    """
    images, annotations = [], []
    for index, record in enumerate(records):
        what = f"record {index} (image_id {record.image_id!r})"
        image_id = _require_int_id(record.image_id, what=what, format_name="COCO")
        if image_dir is not None:
            file_name = _relative_image(record.image, Path(image_dir), what=what, format_name="COCO")
        else:
            file_name = _relative_image(record.image, Path(record.image).parent, what=what, format_name="COCO")
        width, height = _image_size(record.image, image_size)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for caption in record.captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    info = dict(info or {"description": "written by multimodal_models", "version": "1.0"})
    if description is not None:
        info["description"] = description
    document = {
        "info": info,
        "licenses": [dict(entry) for entry in licenses],
        "images": images,
        "annotations": annotations,
    }
    return _write_json(path, document)


def _image_size(image: ImageSource, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(width, height): the size given for every image, else the file header's."""
    if size is None:
        return read_image_size(image)
    if isinstance(size, int):
        return size, size
    width, height = size
    return width, height


def read_caption_results(path: PathLike) -> dict[int | str, str]:
    """Read COCO caption results [{"image_id", "caption"}] into {image_id: caption}.

    A duplicate image id is an error: the COCO caption evaluation would score the image
    with several candidate captions and mis-report it.
    """
    file = Path(path)
    data = _top_level(file, _load_json(file), "list", 'COCO results layout [{"image_id": ..., "caption": ...}]')
    results: dict[int | str, str] = {}
    where: dict[int | str, int] = {}
    for index, entry in enumerate(data):
        label = f"[{index}]"
        _check(file, entry, "object", record=label, field=None)
        image_id = _get(file, entry, "image_id", "id", record=label)
        if image_id in results:
            raise DataFormatError(
                file,
                f"duplicate image_id {image_id!r} (first at [{where[image_id]}]); one caption per image",
                record=label,
                field="image_id",
            )
        results[image_id] = _get(file, entry, "caption", "string", record=label)
        where[image_id] = index
    return results


def write_caption_results(path: PathLike, captions: Mapping[int | str, str]) -> Path:
    """Write {image_id: caption} as COCO caption results [{"image_id", "caption"}]."""
    return _write_json(path, [{"image_id": image_id, "caption": caption} for image_id, caption in captions.items()])


# =========================================================================================
# Karpathy splits (dataset_coco.json, dataset_flickr30k.json)
# =========================================================================================


def read_karpathy(
    path: PathLike,
    image_root: PathLike,
    split: str | Iterable[str] | None = None,
    *,
    check_images: bool = False,
) -> list[CaptionRecord]:
    """Read a Karpathy split file into CaptionRecords (one per image, file order).

    Layout: {"dataset", "images": [{"filepath"?, "filename", "imgid", "split",
    "sentences": [{"raw", "tokens", "imgid", "sentid"}], "sentids", "cocoid"?}]}.
    The image is `image_root / filepath / filename` (Flickr30k has no filepath). The
    record's image_id is `cocoid` when present (the id COCO evaluation uses), else `imgid`.
    Captions are the `raw` sentences, verbatim. `split` keeps only images of that split
    (or of any of several, e.g. ("train", "restval")); a split absent from the file is an error.
    """
    file = Path(path)
    data = _top_level(file, _load_json(file), "object", 'Karpathy layout {"dataset": ..., "images": [...]}')
    image_root = Path(image_root)
    wanted = {split} if isinstance(split, str) else (set(split) if split is not None else None)
    kept: list[tuple[str, CaptionRecord]] = []
    splits_seen: set[str] = set()
    for _, label, entry in _objects(file, data, "images"):
        imgid = _get(file, entry, "imgid", "integer", record=label)
        label = f"{label} (imgid {imgid})"
        image_id = _get(file, entry, "cocoid", "integer", record=label, default=imgid)
        filename = _get(file, entry, "filename", "text", record=label)
        filepath = _get(file, entry, "filepath", "string", record=label, default="")
        image_split = _get(file, entry, "split", "text", record=label)
        sentences = _get(file, entry, "sentences", "list", record=label)
        captions = []
        for position, sentence in enumerate(sentences):
            prefix = f"sentences[{position}]"
            _check(file, sentence, "object", record=label, field=prefix)
            captions.append(_get(file, sentence, "raw", "string", record=label, prefix=prefix + "."))
        splits_seen.add(image_split)
        if wanted is None or image_split in wanted:
            kept.append(
                (label, CaptionRecord(image_id, image_root / filepath / filename, tuple(captions), image_split))
            )
    if wanted is not None and not wanted & splits_seen:
        raise ValueError(f"{file}: no images with split {sorted(wanted)}; the file has splits {sorted(splits_seen)}")
    if check_images:
        _require_images_exist(file, ((label, "filename", record.image) for label, record in kept))
    return [record for _, record in kept]


def write_karpathy(
    path: PathLike, records: Iterable[CaptionRecord], *, image_root: PathLike, dataset: str = "coco"
) -> Path:
    """Write records as a Karpathy split file.

    Each record needs a `split`. Images are stored as `filepath` (the folder below
    `image_root`, omitted when empty) + `filename`; `imgid`/`sentid` are numbered in order;
    integer image ids are written as `cocoid` (so `read_karpathy` gives them back).
    `tokens` are the lower-cased words of each caption, punctuation dropped.
    """
    image_root = Path(image_root)
    images: list[dict[str, Any]] = []
    next_sentid = 0
    for imgid, record in enumerate(records):
        what = f"record {imgid} (image_id {record.image_id!r})"
        if not record.split:
            raise ValueError(f"{what}: Karpathy files need a split ('train', 'val', 'test' or 'restval')")
        relative = _relative_image(record.image, image_root, what=what, format_name="Karpathy")
        folder, _, filename = relative.rpartition("/")
        sentences = []
        for raw in record.captions:
            sentences.append({"tokens": _karpathy_tokens(raw), "raw": raw, "imgid": imgid, "sentid": next_sentid})
            next_sentid += 1
        entry: dict[str, Any] = {}
        if folder:
            entry["filepath"] = folder
        entry.update(
            sentids=[s["sentid"] for s in sentences],
            filename=filename,
            imgid=imgid,
            split=record.split,
            sentences=sentences,
        )
        if _is_int(record.image_id):
            entry["cocoid"] = record.image_id
        images.append(entry)
    return _write_json(path, {"images": images, "dataset": dataset})


def _karpathy_tokens(raw: str) -> list[str]:
    """Lower-cased alphanumeric words of a caption (Karpathy's `tokens` drop punctuation)."""
    return re.findall(r"[a-z0-9]+", raw.lower())


# =========================================================================================
# VQA v2 (questions + annotations) and VQA results
# =========================================================================================

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
_TRAILING_NUMBER = re.compile(r"(\d+)$")


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
        answers = []
        for position, answer in enumerate(_get(file, entry, "answers", "list", record=label)):
            prefix = f"answers[{position}]"
            _check(file, answer, "object", record=label, field=prefix)
            answers.append(_get(file, answer, "answer", "string", record=label, prefix=prefix + "."))
        annotations[question_id] = {
            "answers": tuple(answers),
            "answer": _get(file, entry, "multiple_choice_answer", "string", record=label),
            "answer_type": _get(file, entry, "answer_type", "string", record=label, default=None),
            "question_type": _get(file, entry, "question_type", "string", record=label, default=None),
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


def _vqa_header(data_subtype: str, data_type: str, info: Mapping | None, license: Mapping | None) -> dict[str, Any]:
    return {
        "info": dict(info or {"description": "written by multimodal_models", "version": "1.0"}),
        "data_type": data_type,
        "data_subtype": data_subtype,
        "license": dict(license or {"name": "", "url": ""}),
    }


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
        what = f"record {index} (question_id {record.question_id!r})"
        questions.append(
            {
                "image_id": _require_int_id(record.image_id, what=what, format_name="VQA"),
                "question": record.question,
                "question_id": _require_int_id(record.question_id, what=what, format_name="VQA"),
            }
        )
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
        what = f"record {index} (question_id {record.question_id!r})"
        if record.answer is None:
            raise ValueError(f"{what}: no answer; VQA annotations need multiple_choice_answer")
        annotations.append(
            {
                "question_type": record.question_type or "none of the above",
                "multiple_choice_answer": record.answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": number}
                    for number, answer in enumerate(record.answers, start=1)
                ],
                "image_id": _require_int_id(record.image_id, what=what, format_name="VQA"),
                "answer_type": record.answer_type or "other",
                "question_id": _require_int_id(record.question_id, what=what, format_name="VQA"),
            }
        )
    return _write_json(path, {**_vqa_header(data_subtype, data_type, info, license), "annotations": annotations})


def read_vqa_results(path: PathLike) -> dict[int | str, str]:
    """Read VQA results [{"question_id", "answer"}] into {question_id: answer}; duplicates are errors."""
    file = Path(path)
    data = _top_level(file, _load_json(file), "list", 'VQA results layout [{"question_id": ..., "answer": ...}]')
    results: dict[int | str, str] = {}
    where: dict[int | str, int] = {}
    for index, entry in enumerate(data):
        label = f"[{index}]"
        _check(file, entry, "object", record=label, field=None)
        question_id = _get(file, entry, "question_id", "id", record=label)
        if question_id in results:
            raise DataFormatError(
                file,
                f"duplicate question_id {question_id!r} (first at [{where[question_id]}]); one answer per question",
                record=label,
                field="question_id",
            )
        results[question_id] = _get(file, entry, "answer", "string", record=label)
        where[question_id] = index
    return results


def write_vqa_results(path: PathLike, answers: Mapping[int | str, str]) -> Path:
    """Write {question_id: answer} as VQA results [{"question_id", "answer"}]."""
    return _write_json(
        path, [{"question_id": question_id, "answer": answer} for question_id, answer in answers.items()]
    )


# =========================================================================================
# LLaVA conversations (LLaVA-Instruct-150K, llava_v1_5_mix665k)
# =========================================================================================

_FROM_LLAVA_ROLE = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_TO_LLAVA_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def read_llava(path: PathLike, image_dir: PathLike, *, check_images: bool = False) -> list[ConversationRecord]:
    """Read LLaVA conversation JSON (or JSON Lines, by a .jsonl suffix) into ConversationRecords.

    Layout: [{"id", "image"? (a path or a list of paths, relative to `image_dir`),
    "conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}]; roles become
    user / assistant / system ("user"/"assistant" are accepted too). Entries without
    "image" are text-only. The number of `<image>` markers over all turns must equal the
    number of images (LLaVA puts "<image>\\n" in the first human turn).
    """
    file = Path(path)
    image_dir = Path(image_dir)
    if file.suffix.lower() == ".jsonl":
        entries = _json_lines(file)
    else:
        data = _top_level(
            file, _load_json(file), "list", 'LLaVA layout [{"id": ..., "image": ..., "conversations": [...]}]'
        )
        entries = [(f"[{index}]", entry) for index, entry in enumerate(data)]
    records, references = [], []
    for label, entry in entries:
        _check(file, entry, "object", record=label, field=None)
        record, label = _llava_record(file, entry, label, image_dir)
        records.append(record)
        references.extend((label, "image", image) for image in record.images)
    if check_images:
        _require_images_exist(file, references)
    return records


def _llava_record(file: Path, entry: Mapping, label: str, image_dir: Path) -> tuple[ConversationRecord, str]:
    """One validated conversation and its record label (with the id)."""
    record_id = _get(file, entry, "id", "id", record=label)
    label = f"{label} (id {record_id})"
    image_value = entry.get("image")
    if image_value is None:
        images: tuple[Path, ...] = ()
    elif isinstance(image_value, str) and image_value:
        images = (image_dir / image_value,)
    elif isinstance(image_value, list) and all(isinstance(v, str) and v for v in image_value):
        images = tuple(image_dir / value for value in image_value)
    else:
        raise DataFormatError(
            file, f"expected a path or a list of paths, got {_describe(image_value)}", record=label, field="image"
        )
    turns = []
    for position, message in enumerate(_get(file, entry, "conversations", "list", record=label)):
        prefix = f"conversations[{position}]"
        _check(file, message, "object", record=label, field=prefix)
        speaker = _get(file, message, "from", "string", record=label, prefix=prefix + ".")
        if speaker not in _FROM_LLAVA_ROLE:
            raise DataFormatError(
                file, f"expected 'human', 'gpt' or 'system', got {speaker!r}", record=label, field=prefix + ".from"
            )
        text = _get(file, message, "value", "string", record=label, prefix=prefix + ".")
        turns.append(Turn(role=_FROM_LLAVA_ROLE[speaker], text=text))
    if not turns:
        raise DataFormatError(
            file, "expected at least one message, got an empty list", record=label, field="conversations"
        )
    markers = sum(turn.text.count(IMAGE_MARKER) for turn in turns)
    if markers != len(images):
        raise DataFormatError(
            file,
            f"{markers} '{IMAGE_MARKER}' marker(s) in the messages for {len(images)} image(s); each image needs one "
            f"marker (LLaVA puts '{IMAGE_MARKER}\\n' at the start of the first human message)",
            record=label,
            field="conversations",
        )
    return ConversationRecord(id=str(record_id), images=images, turns=tuple(turns)), label


def _json_lines(file: Path) -> list[tuple[str, Any]]:
    """Parse a JSON Lines file into (record label "line N", value) pairs; blank lines are skipped."""
    rows = []
    for number, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataFormatError(file, f"invalid JSON at line {number}, column {exc.colno}: {exc.msg}") from None
    return rows


def write_llava(path: PathLike, records: Iterable[ConversationRecord], *, image_dir: PathLike) -> Path:
    """Write ConversationRecords as LLaVA JSON; images are stored relative to `image_dir`.

    One image is written as a string, several as a list, none by leaving "image" out.
    """
    image_dir = Path(image_dir)
    entries = []
    for index, record in enumerate(records):
        what = f"record {index} (id {record.id!r})"
        entry: dict[str, Any] = {"id": record.id}
        paths = [_relative_image(image, image_dir, what=what, format_name="LLaVA") for image in record.images]
        if len(paths) == 1:
            entry["image"] = paths[0]
        elif paths:
            entry["image"] = paths
        conversations = []
        for turn in record.turns:
            if turn.role not in _TO_LLAVA_ROLE:
                raise ValueError(f"{what}: role {turn.role!r} is not one of {ROLES}")
            conversations.append({"from": _TO_LLAVA_ROLE[turn.role], "value": turn.text})
        entry["conversations"] = conversations
        entries.append(entry)
    return _write_json(path, entries, indent=2)


# =========================================================================================
# MMMU parquet (MMMU/MMMU on the Hugging Face hub)
# =========================================================================================

MMMU_IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))
MMMU_COLUMNS = (
    "id",
    "question",
    "options",
    "explanation",
    *MMMU_IMAGE_COLUMNS,
    "img_type",
    "answer",
    "topic_difficulty",
    "question_type",
    "subfield",
)
_MMMU_REQUIRED = ("id", "question", "options", "answer")
_MMMU_EXTRA = ("explanation", "img_type", "topic_difficulty")  # kept in MultipleChoiceRecord.extra
_MMMU_ID = re.compile(r"^(?:dev|validation|test)_(.+)_\d+$")
_IMAGE_REFERENCE = re.compile(r"<image (\d+)>")
_MMMU_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def read_mmmu(path: PathLike) -> list[MultipleChoiceRecord]:
    """Read MMMU parquet files (a file, or every *.parquet below a folder, sorted by path).

    Columns: id, question, options (a Python list literal in a string), explanation,
    image_1..image_7 (struct {bytes, path} or null), img_type, answer, topic_difficulty,
    question_type, subfield. Images are returned as their encoded bytes (or, for a struct
    with only a path, as that path relative to the parquet file's folder). The subject
    comes from the id ("validation_Art_Theory_3" -> "Art_Theory"), else from the folder
    name (MMMU's layout is <Subject>/<split>-*.parquet). Every "<image k>" in the question
    or options must have an image_k, and image columns must be filled without gaps.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(root.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{root}: no .parquet files in this folder or below it")
    else:
        files = [root]
    return [record for file in files for record in _read_mmmu_file(file)]


def _read_mmmu_file(file: Path) -> list[MultipleChoiceRecord]:
    """The records of one MMMU parquet file."""
    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataFormatError(file, f"not a readable parquet file: {exc}") from None
    columns = _mmmu_columns(file, table)
    image_columns = [name for name in MMMU_IMAGE_COLUMNS if name in columns]
    records = []
    for row in range(table.num_rows):
        values = {name: column[row] for name, column in columns.items()}
        records.append(_mmmu_record(file, row, values, image_columns))
    return records


def _mmmu_columns(file: Path, table: pa.Table) -> dict[str, list]:
    """Check the schema and return the known columns as Python lists."""
    names = set(table.column_names)
    missing = [name for name in _MMMU_REQUIRED if name not in names]
    if missing:
        raise DataFormatError(
            file, f"missing column(s) {missing}; MMMU columns are {list(MMMU_COLUMNS)}", field=missing[0]
        )
    columns = {}
    for name in MMMU_COLUMNS:
        if name not in names:
            continue
        arrow_type = table.schema.field(name).type
        if name in MMMU_IMAGE_COLUMNS:
            is_image = pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0
            if not (is_image or pa.types.is_null(arrow_type)):
                raise DataFormatError(
                    file, f"expected an image column struct{{bytes, path}}, got {arrow_type}", field=name
                )
        elif not (
            pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)
        ):
            raise DataFormatError(file, f"expected a string column, got {arrow_type}", field=name)
        columns[name] = table.column(name).to_pylist()
    return columns


def _mmmu_record(file: Path, row: int, values: Mapping[str, Any], image_columns: Sequence[str]) -> MultipleChoiceRecord:
    """Validate one row and build its record."""
    label = f"row {row}"
    record_id = _check(file, values["id"], "text", record=label, field="id")
    label = f"row {row} (id {record_id})"
    question = _check(file, values["question"], "string", record=label, field="question")
    options = _parse_options(file, values["options"], label)
    answer = _check(file, values["answer"], "string", record=label, field="answer")
    images = _mmmu_images(file, values, image_columns, label)
    _check_image_references(file, question, options, len(images), label)
    text_or_empty = {name: values.get(name) for name in ("question_type", "subfield", *_MMMU_EXTRA)}
    for name, value in text_or_empty.items():
        if value is not None:
            _check(file, value, "string", record=label, field=name)
    match = _MMMU_ID.match(record_id)
    return MultipleChoiceRecord(
        id=record_id,
        question=question,
        options=options,
        answer=answer,
        images=images,
        subject=match.group(1) if match else file.parent.name,
        subfield=text_or_empty["subfield"] or "",
        question_type=text_or_empty["question_type"] or "multiple-choice",
        extra={name: text_or_empty[name] for name in _MMMU_EXTRA if text_or_empty[name] is not None},
    )


def _parse_options(file: Path, value: Any, label: str) -> tuple[str, ...]:
    """Parse MMMU's options string, a Python list literal such as "['A cat', 'A dog']"."""
    _check(file, value, "string", record=label, field="options")
    expected = "a Python list literal of strings such as \"['red', 'blue']\""
    try:
        options = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise DataFormatError(
            file, f"expected {expected}, got {_describe(value)}", record=label, field="options"
        ) from None
    if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
        raise DataFormatError(file, f"expected {expected}, got {_describe(value)}", record=label, field="options")
    return tuple(options)


def _mmmu_images(
    file: Path, values: Mapping[str, Any], image_columns: Sequence[str], label: str
) -> tuple[ImageSource, ...]:
    """The row's images from image_1.. onwards, refusing gaps (image_3 set, image_2 empty)."""
    images: list[ImageSource] = []
    empty_column = None
    for name in image_columns:
        cell = values.get(name)
        image = _mmmu_image(file, cell, label, name)
        if image is None:
            empty_column = empty_column or name
            continue
        if empty_column is not None:
            raise DataFormatError(
                file,
                f"{name} is set but {empty_column} is empty; images must fill image_1, image_2, ... without gaps",
                record=label,
                field=name,
            )
        images.append(image)
    return tuple(images)


def _mmmu_image(file: Path, cell: Any, label: str, name: str) -> ImageSource | None:
    """One image struct {bytes, path} -> bytes (or a Path when only the path is stored); None if empty."""
    if cell is None:
        return None
    data, path = cell.get("bytes"), cell.get("path")
    if data:
        return bytes(data)
    if path:
        return file.parent / path
    return None


def _check_image_references(file: Path, question: str, options: Sequence[str], count: int, label: str) -> None:
    """Every "<image k>" in the question or options must have an image_k."""
    for field, texts in (("question", [question]), ("options", options)):
        for text in texts:
            for number in map(int, _IMAGE_REFERENCE.findall(text)):
                if not 1 <= number <= count:
                    raise DataFormatError(
                        file, f"refers to <image {number}> but the row has {count} image(s)", record=label, field=field
                    )


def write_mmmu_parquet(path: PathLike, records: Iterable[MultipleChoiceRecord]) -> Path:
    """Write records as an MMMU parquet file (MMMU's columns, in MMMU's order).

    Options are written as a Python list literal; explanation, img_type and
    topic_difficulty come from `record.extra` (empty strings when absent). Images (at most
    7) are stored as {bytes, path}: bytes as given, or read from a path (whose file name
    is stored as `path`).
    """
    columns: dict[str, list] = {name: [] for name in MMMU_COLUMNS}
    for index, record in enumerate(records):
        if len(record.images) > len(MMMU_IMAGE_COLUMNS):
            raise ValueError(f"record {index} (id {record.id!r}): {len(record.images)} images; MMMU has at most 7")
        row = {
            "id": record.id,
            "question": record.question,
            "options": repr(list(record.options)),
            "answer": record.answer,
            "question_type": record.question_type,
            "subfield": record.subfield,
            **{name: str(record.extra.get(name, "")) for name in _MMMU_EXTRA},
        }
        for number, name in enumerate(MMMU_IMAGE_COLUMNS):
            row[name] = _image_struct(record.images[number]) if number < len(record.images) else None
        for name in MMMU_COLUMNS:
            columns[name].append(row[name])
    schema = pa.schema(
        [(name, _MMMU_IMAGE_TYPE if name in MMMU_IMAGE_COLUMNS else pa.string()) for name in MMMU_COLUMNS]
    )
    table = pa.table(columns, schema=schema)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes())
    return Path(path)


def _image_struct(image: ImageSource) -> dict[str, Any]:
    """An MMMU image cell for `image` (bytes, or a file read now)."""
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    path = Path(image)
    return {"bytes": path.read_bytes(), "path": path.name}


# =========================================================================================
# Plain JSONL / CSV tables next to an image folder
# =========================================================================================


def read_table(
    path: PathLike,
    image_dir: PathLike | None = None,
    *,
    confine: bool = False,
    check_images: bool = False,
) -> list[VQARecord] | list[CaptionRecord]:
    """Read a .jsonl or .csv table of VQA rows or caption rows.

    VQA rows: "image", "question", and optionally "answer", "answers" (a list in JSONL, a
    JSON array string in CSV), "question_id", "image_id", "answer_type", "question_type".
    Caption rows: "image", "caption", and optionally "image_id", "split"; rows of the same
    image are grouped into one CaptionRecord (in order of first appearance).
    Which kind a table holds is told from its columns (JSONL: the keys of all rows).

    Image paths are relative to `image_dir` (default: the table's folder). Missing ids
    default to the row index (question_id) and the image path as written (image_id).
    A VQA row with "answer" but no "answers" gets answers=(answer,). With `confine=True`,
    absolute paths and paths leading outside `image_dir` are rejected (for serving).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows, columns, is_csv = _jsonl_rows(file), None, False
    elif suffix == ".csv":
        (rows, columns), is_csv = _csv_rows(file), True
    else:
        raise DataFormatError(file, f"unsupported table type {suffix or '(no extension)'!r}; expected .jsonl or .csv")
    if not rows:
        raise DataFormatError(file, "the table has no rows")
    if columns is None:
        columns = [key for _, row in rows for key in row]
    kind = _table_kind(file, set(columns))
    reader = _TableRows(file, Path(image_dir) if image_dir is not None else file.parent, confine, is_csv)
    records = reader.vqa(rows) if kind == "vqa" else reader.captions(rows)
    if check_images:
        _require_images_exist(file, reader.references)
    return records


def _jsonl_rows(file: Path) -> list[tuple[str, dict]]:
    """The rows of a JSON Lines table; each must be an object."""
    rows = _json_lines(file)
    for label, row in rows:
        _check(file, row, "object", record=label, field=None)
    return rows


def _csv_rows(file: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """The rows of a CSV table with a header line; ragged rows are errors."""
    reader = csv.DictReader(io.StringIO(_read_text(file), newline=""))
    header = reader.fieldnames
    if not header:
        raise DataFormatError(file, "empty CSV file; expected a header line such as 'image,question,answer'")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataFormatError(file, f"the header repeats column(s) {duplicates}", field=duplicates[0])
    rows = []
    try:
        for row in reader:
            label = f"line {reader.line_num}"
            if None in row or any(value is None for value in row.values()):
                count = len(row.get(None) or []) + sum(
                    value is not None for key, value in row.items() if key is not None
                )
                raise DataFormatError(file, f"{count} field(s) where the header has {len(header)}", record=label)
            rows.append((label, row))
    except csv.Error as exc:
        raise DataFormatError(file, f"malformed CSV: {exc}", record=f"line {reader.line_num}") from None
    return rows, list(header)


def _table_kind(file: Path, columns: set[str]) -> str:
    """'vqa' or 'captions', from the column names."""
    found = sorted(columns)
    if "image" not in columns:
        raise DataFormatError(file, f"no 'image' column (found {found}); every row needs an image path", field="image")
    if "question" in columns and "caption" in columns:
        raise DataFormatError(
            file,
            "has both 'question' and 'caption' columns; a table holds either VQA rows or caption rows",
            field="caption",
        )
    if "question" in columns:
        return "vqa"
    if "caption" in columns:
        return "captions"
    raise DataFormatError(
        file, f"expected columns image, question[, answer, answers] (VQA) or image, caption (captions); found {found}"
    )


class _TableRows:
    """Turns table rows (JSONL values or CSV strings) into records, validating each cell."""

    def __init__(self, file: Path, image_dir: Path, confine: bool, is_csv: bool):
        self.file = file
        self.image_dir = image_dir
        self.confine = confine
        self.is_csv = is_csv
        self.references: list[tuple[str, str, Path]] = []  # (record, field, image) for check_images

    def vqa(self, rows: Sequence[tuple[str, Mapping]]) -> list[VQARecord]:
        records, seen = [], {}
        for index, (label, row) in enumerate(rows):
            image_value = self.text(row, "image", label)
            question_id = self.identifier(row, "question_id", label, default=index)
            if question_id in seen:
                raise DataFormatError(
                    self.file,
                    f"duplicate question_id {question_id!r} (also {seen[question_id]})",
                    record=label,
                    field="question_id",
                )
            seen[question_id] = label
            answer = self.text(row, "answer", label, required=False)
            answers = self.answers(row, label)
            records.append(
                VQARecord(
                    question_id=question_id,
                    image_id=self.identifier(row, "image_id", label, default=image_value),
                    image=self.image(image_value, label),
                    question=self.text(row, "question", label),
                    answers=answers if answers is not None else ((answer,) if answer is not None else ()),
                    answer=answer,
                    answer_type=self.text(row, "answer_type", label, required=False),
                    question_type=self.text(row, "question_type", label, required=False),
                )
            )
        return records

    def captions(self, rows: Sequence[tuple[str, Mapping]]) -> list[CaptionRecord]:
        groups: dict[str, dict[str, Any]] = {}
        for label, row in rows:
            image_value = self.text(row, "image", label)
            image_id = self.identifier(row, "image_id", label, default=image_value)
            split = self.text(row, "split", label, required=False)
            caption = self.text(row, "caption", label)
            group = groups.get(image_value)
            if group is None:
                group = groups[image_value] = {
                    "image_id": image_id,
                    "image": self.image(image_value, label),
                    "split": split,
                    "captions": [],
                    "label": label,
                }
            for name, value in (("image_id", image_id), ("split", split)):
                if group[name] != value:
                    raise DataFormatError(
                        self.file,
                        f"{value!r} differs from {group[name]!r} given for the same image at {group['label']}",
                        record=label,
                        field=name,
                    )
            group["captions"].append(caption)
        return [CaptionRecord(g["image_id"], g["image"], tuple(g["captions"]), g["split"]) for g in groups.values()]

    # --- cells -----------------------------------------------------------------------------

    def text(self, row: Mapping, key: str, label: str, *, required: bool = True) -> str | None:
        """A string cell; empty or absent is an error when required, else None."""
        value = row.get(key)
        if value is None or value == "":
            if required:
                phrase = (
                    "missing; expected a non-empty string"
                    if key not in row
                    else f"expected a non-empty string, got {_describe(value)}"
                )
                raise DataFormatError(self.file, phrase, record=label, field=key)
            return None
        return _check(self.file, value, "string", record=label, field=key)

    def identifier(self, row: Mapping, key: str, label: str, *, default: int | str) -> int | str:
        """An id cell (int or string; digit strings in CSV become ints), or `default`."""
        value = row.get(key)
        if value is None or value == "":
            return default
        if self.is_csv and value.isascii() and value.isdigit():
            return int(value)
        return _check(self.file, value, "id", record=label, field=key)

    def answers(self, row: Mapping, label: str) -> tuple[str, ...] | None:
        """The optional list of human answers (a JSON array string in CSV)."""
        value = row.get("answers")
        if value is None or value == "":
            return None
        expected = 'a list of strings such as ["red", "red", "dark red"]'
        if self.is_csv:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DataFormatError(
                    self.file, f"expected {expected}, got {_describe(row['answers'])}", record=label, field="answers"
                ) from None
        if not isinstance(value, list) or not all(isinstance(answer, str) for answer in value):
            raise DataFormatError(
                self.file, f"expected {expected}, got {_describe(value)}", record=label, field="answers"
            )
        return tuple(value)

    def image(self, value: str, label: str) -> Path:
        """Resolve an image path against the image folder (checking confinement if asked)."""
        if self.confine:
            path = _confined_path(self.file, value, self.image_dir, label)
        else:
            path = self.image_dir / value
        self.references.append((label, "image", path))
        return path


def _confined_path(file: Path, value: str, image_dir: Path, label: str) -> Path:
    """`image_dir / value`, refusing absolute paths and paths that lead outside `image_dir`."""
    if "\x00" in value:
        raise DataFormatError(file, "the image path contains a NUL character", record=label, field="image")
    if Path(value).is_absolute() or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise DataFormatError(
            file,
            f"absolute image path {value!r} is not allowed; give a path relative to {image_dir}",
            record=label,
            field="image",
        )
    root = image_dir.resolve()
    resolved = (root / value).resolve()
    if not resolved.is_relative_to(root):
        raise DataFormatError(
            file, f"image path {value!r} leads outside the image folder {image_dir}", record=label, field="image"
        )
    return resolved


def write_table(
    path: PathLike, records: Iterable[VQARecord] | Iterable[CaptionRecord], *, image_dir: PathLike | None = None
) -> Path:
    """Write VQA or caption records as a .jsonl or .csv table that `read_table` reads back.

    Image paths are written relative to `image_dir` (default: the table's folder). Caption
    records become one row per caption. Optional columns (answers, answer_type,
    question_type, split) are written when any record has them.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise ValueError(f"{file}: unsupported table type {suffix!r}; expected .jsonl or .csv")
    image_dir = Path(image_dir) if image_dir is not None else file.parent
    records = list(records)
    rows = _table_rows(records, image_dir)
    if suffix == ".csv":
        atomic_write_text(file, _csv_text(rows))
    else:
        atomic_write_text(file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return file


def _table_rows(records: Sequence[VQARecord | CaptionRecord], image_dir: Path) -> list[dict[str, Any]]:
    """Rows (dicts) for `write_table`, with optional columns only when used."""
    rows = []
    for index, record in enumerate(records):
        what = f"record {index}"
        image = _relative_image(record.image, image_dir, what=what, format_name="table")
        if isinstance(record, VQARecord):
            rows.append(
                {
                    "question_id": record.question_id,
                    "image_id": record.image_id,
                    "image": image,
                    "question": record.question,
                    "answer": record.answer,
                    "answers": list(record.answers),
                    "answer_type": record.answer_type,
                    "question_type": record.question_type,
                }
            )
        elif isinstance(record, CaptionRecord):
            if not record.captions:
                raise ValueError(
                    f"{what} (image_id {record.image_id!r}): no captions; a caption table has one row per caption"
                )
            rows.extend(
                {"image_id": record.image_id, "image": image, "caption": caption, "split": record.split}
                for caption in record.captions
            )
        else:
            raise TypeError(f"{what}: expected VQARecord or CaptionRecord, got {type(record).__name__}")
    optional = ("answer_type", "question_type", "split")
    unused = {key for key in optional if all(not row.get(key) for row in rows)}
    return [{key: value for key, value in row.items() if key not in unused} for row in rows]


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV text; lists become JSON arrays and None an empty cell."""
    columns = list(rows[0]) if rows else ["image"]
    with io.StringIO(newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    key: (
                        json.dumps(value, ensure_ascii=False)
                        if isinstance(value, list)
                        else ("" if value is None else value)
                    )
                    for key, value in row.items()
                }
            )
        return handle.getvalue()
