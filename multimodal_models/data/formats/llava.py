"""LLaVA conversations (LLaVA-Instruct-150K, llava_v1_5_mix665k): read_llava / write_llava."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from multimodal_models.data.records import ROLES, ConversationRecord, Turn
from multimodal_models.errors import DataFormatError

from ._common import (
    PathLike,
    _check,
    _describe,
    _get,
    _grounding_json,
    _json_lines,
    _load_json,
    _nested_objects,
    _read_grounding,
    _relative_image,
    _require_images_exist,
    _top_level,
    _write_json,
)

IMAGE_MARKER = "<image>"  # LLaVA's placeholder for one image in a turn's text

_FROM_LLAVA_ROLE = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_TO_LLAVA_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def read_llava(path: PathLike, image_dir: PathLike, *, check_images: bool = False) -> list[ConversationRecord]:
    """Read LLaVA conversation JSON (or JSON Lines, by a .jsonl suffix) into ConversationRecords.

    Layout: [{"id", "image"? (a path or a list of paths, relative to `image_dir`),
    "conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}]; roles become
    user / assistant / system ("user"/"assistant" are accepted too). Entries without
    "image" are text-only. The number of `<image>` markers over all turns must equal the
    number of images (LLaVA puts "<image>\\n" in the first human turn). A human message may
    also carry grounding ("referents", "evidence", as in a VQA annotation) and a "question_type"
    (the form of its question: dialogue accuracy is then reported per form); Shapes writes both.
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
    for prefix, message in _nested_objects(file, entry, "conversations", record=label):
        speaker = _get(file, message, "from", "string", record=label, prefix=prefix)
        if speaker not in _FROM_LLAVA_ROLE:
            raise DataFormatError(
                file, f"expected 'human', 'gpt' or 'system', got {speaker!r}", record=label, field=prefix + "from"
            )
        text = _get(file, message, "value", "string", record=label, prefix=prefix)
        question_type = _get(file, message, "question_type", "string", record=label, prefix=prefix, default=None)
        turns.append(Turn(role=_FROM_LLAVA_ROLE[speaker], text=text, question_type=question_type,
                          **_read_grounding(file, message, record=label, prefix=prefix)))
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
            message = {"from": _TO_LLAVA_ROLE[turn.role], "value": turn.text} | _grounding_json(turn)
            if turn.question_type is not None:
                message["question_type"] = turn.question_type
            conversations.append(message)
        entry["conversations"] = conversations
        entries.append(entry)
    return _write_json(path, entries, indent=2)
