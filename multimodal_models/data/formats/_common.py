"""Helpers shared by the format modules: reading JSON, checking fields, checking images, writing files.

Private to `multimodal_models.data.formats`. The checking helpers raise `DataFormatError`s
naming the file, the record and the field, with what was expected and what was found, e.g.

    captions_val2014.json, record annotations[17] (id 48), field 'caption': expected a string, got null
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from multimodal_models.data.records import ImageSource
from multimodal_models.errors import DataFormatError
from multimodal_models.io import atomic_write_json

PathLike = str | os.PathLike

_MAX_LISTED = 5  # how many missing images (or ambiguous files) an error message lists by name
_DEFAULT_INFO = {"description": "written by multimodal_models", "version": "1.0"}  # "info" of written COCO/VQA files
_MISSING = object()


# --- reading ---------------------------------------------------------------------------------


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


# --- checking values -------------------------------------------------------------------------


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
    """An int that is not a bool."""
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


def _nested_objects(file: Path, obj: Mapping, key: str, *, record: object) -> Iterator[tuple[str, dict]]:
    """Yield (field prefix "key[position].", item) for a required list of objects `obj[key]` inside one record."""
    for position, item in enumerate(_get(file, obj, key, "list", record=record)):
        prefix = f"{key}[{position}]"
        _check(file, item, "object", record=record, field=prefix)
        yield prefix + ".", item


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


# --- result files (COCO caption results, VQA results) -----------------------------------------


def _read_results(path: PathLike, id_key: str, value_key: str, layout: str) -> dict[int | str, str]:
    """Read a results list [{id_key, value_key}] into {id: value}; a repeated id is an error.

    The evaluations score one value per id ("one caption per image", "one answer per
    question"); a repeated id would be scored several times and mis-reported.
    """
    file = Path(path)
    data = _top_level(file, _load_json(file), "list", layout)
    results: dict[int | str, str] = {}
    where: dict[int | str, int] = {}
    for index, entry in enumerate(data):
        label = f"[{index}]"
        _check(file, entry, "object", record=label, field=None)
        key = _get(file, entry, id_key, "id", record=label)
        if key in results:
            per = id_key.removesuffix("_id")
            raise DataFormatError(
                file,
                f"duplicate {id_key} {key!r} (first at [{where[key]}]); one {value_key} per {per}",
                record=label,
                field=id_key,
            )
        results[key] = _get(file, entry, value_key, "string", record=label)
        where[key] = index
    return results


def _write_results(path: PathLike, values: Mapping[int | str, str], id_key: str, value_key: str) -> Path:
    """Write {id: value} as a results list [{id_key, value_key}]."""
    return _write_json(path, [{id_key: key, value_key: value} for key, value in values.items()])


# --- writing ---------------------------------------------------------------------------------


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


# --- grounding annotations: object centres a question (or a conversation turn) is about ----------


def _points(file: Path, value, *, record: str, field: str) -> tuple[tuple[float, float], ...]:
    """A list of [x, y] object centres, fractions of the image side (grounding annotations)."""
    if not isinstance(value, list):
        raise DataFormatError(file, f"expected a list of [x, y] points, got {_describe(value)}", record=record, field=field)
    points = []
    for k, point in enumerate(value):
        if (not isinstance(point, list) or len(point) != 2
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in point)):
            raise DataFormatError(file, f"expected [x, y] with both in [0, 1] (fractions of the image side), "
                                  f"got {point!r}", record=record, field=f"{field}[{k}]")
        points.append((float(point[0]), float(point[1])))
    return tuple(points)


def _read_grounding(file: Path, entry: Mapping, *, record: str, prefix: str = "") -> dict:
    """The optional "referents" (a list of point lists, one per description) and "evidence" (a point
    list, possibly empty; absent: not annotated) of a VQA annotation or a conversation message, as
    VQARecord / Turn fields."""
    groups = _get(file, entry, "referents", "list", record=record, prefix=prefix, default=[])
    evidence = _get(file, entry, "evidence", "list", record=record, prefix=prefix, default=None)
    return {
        "referents": tuple(_points(file, group, record=record, field=f"{prefix}referents[{k}]")
                           for k, group in enumerate(groups)),
        "evidence": None if evidence is None else _points(file, evidence, record=record, field=prefix + "evidence"),
    }


def _grounding_json(item) -> dict:
    """The grounding fields of a VQARecord or Turn for JSON, only those it has."""
    out = {}
    if item.referents:
        out["referents"] = [[list(p) for p in group] for group in item.referents]
    if item.evidence is not None:
        out["evidence"] = [list(p) for p in item.evidence]
    return out
