"""COCO captions (captions_train2014.json), COCO caption results, and Karpathy splits.

  COCO captions JSON ...... read_coco_captions / write_coco_captions
  COCO caption results .... read_caption_results / write_caption_results
  Karpathy split JSON ..... read_karpathy / write_karpathy   (dataset_coco.json, dataset_flickr30k.json)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from multimodal_models.data.images import read_image_size
from multimodal_models.data.records import CaptionRecord, ImageSource
from multimodal_models.errors import DataFormatError

from ._common import (
    _DEFAULT_INFO,
    PathLike,
    _get,
    _is_int,
    _load_json,
    _nested_objects,
    _objects,
    _read_results,
    _relative_image,
    _require_images_exist,
    _require_int_id,
    _top_level,
    _write_json,
    _write_results,
)

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
        root = Path(image_dir) if image_dir is not None else Path(record.image).parent
        file_name = _relative_image(record.image, root, what=what, format_name="COCO")
        width, height = _image_size(record.image, image_size)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for caption in record.captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    info = dict(info or _DEFAULT_INFO)
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
    return _read_results(path, "image_id", "caption", 'COCO results layout [{"image_id": ..., "caption": ...}]')


def write_caption_results(path: PathLike, captions: Mapping[int | str, str]) -> Path:
    """Write {image_id: caption} as COCO caption results [{"image_id", "caption"}]."""
    return _write_results(path, captions, "image_id", "caption")


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
        captions = tuple(
            _get(file, sentence, "raw", "string", record=label, prefix=prefix)
            for prefix, sentence in _nested_objects(file, entry, "sentences", record=label)
        )
        splits_seen.add(image_split)
        if wanted is None or image_split in wanted:
            kept.append((label, CaptionRecord(image_id, image_root / filepath / filename, captions, image_split)))
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
