"""Plain JSONL / CSV tables of VQA or caption rows next to an image folder: read_table / write_table."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from multimodal_models.data.records import CaptionRecord, VQARecord
from multimodal_models.errors import DataFormatError
from multimodal_models.io import atomic_write_text

from ._common import PathLike, _check, _describe, _json_lines, _read_text, _relative_image, _require_images_exist


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
