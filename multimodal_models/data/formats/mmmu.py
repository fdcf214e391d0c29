"""MMMU parquet (MMMU/MMMU on the Hugging Face hub): read_mmmu / write_mmmu_parquet.

Images are carried as their encoded bytes, as MMMU embeds them.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from multimodal_models.data.records import ImageSource, MultipleChoiceRecord
from multimodal_models.errors import DataFormatError
from multimodal_models.io import atomic_write_bytes

from ._common import PathLike, _check, _describe

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


def read_mmmu(path: PathLike, split: str | None = "validation") -> list[MultipleChoiceRecord]:
    """Read MMMU parquet files: a file, or a folder laid out as MMMU is published.

    A file is read whatever its name. A folder is read as MMMU's Hugging Face layout,
    <Subject>/<split>-00000-of-00001.parquet with dev, validation and test in every subject
    folder: the files of `split` below it (a subject folder, or the top folder with all
    subjects), sorted by path. A file's split is its name up to the first "-" or "." (so
    "validation.parquet" counts too). split=None reads every .parquet file below the folder.

    Columns: id, question, options (a Python list literal in a string), explanation,
    image_1..image_7 (struct {bytes, path} or null), img_type, answer, topic_difficulty,
    question_type, subfield. The answer is kept as stored: an option letter, free text, a
    list literal of accepted answers ("['24/7', '3.429']", see
    evaluate.metrics.mmmu.gold_answers), or "?" in the test split, whose answers are hidden.
    Images are returned as their encoded bytes (or, for a struct with only a path, as that
    path relative to the parquet file's folder). The subject comes from the id
    ("validation_Art_Theory_3" -> "Art_Theory"), else from the folder name. Every
    "<image k>" in the question or options must have an image_k, and image columns must be
    filled without gaps.
    """
    root = Path(path)
    files = mmmu_split_files(root, split) if root.is_dir() else [root]
    return [record for file in files for record in _read_mmmu_file(file)]


def split_of_file(file: Path) -> str:
    """The split a parquet file's name gives: "validation-00000-of-00001.parquet" -> "validation"."""
    return re.split(r"[-.]", file.name, maxsplit=1)[0]


def mmmu_split_files(folder: Path, split: str | None) -> list[Path]:
    """The .parquet files of `split` in `folder` or below it (every one for split=None), sorted."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .parquet files in this folder or below it")
    if split is None:
        return files
    chosen = [file for file in files if split_of_file(file) == split]
    if not chosen:
        found = sorted({split_of_file(file) for file in files})
        raise FileNotFoundError(
            f"{folder}: no parquet files of split {split!r} in this folder or below it (MMMU's layout: "
            f"<Subject>/<split>-00000-of-00001.parquet); the files here are of split(s) {', '.join(found)}"
        )
    return chosen


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
