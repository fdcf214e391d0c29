"""Lay the generated Shapes annotations out in the real datasets' file formats.

The records are handed to the writers of `multimodal_models.data.formats`, the same
module whose readers load COCO, VQA v2, LLaVA and MMMU files, so reading the Shapes
benchmark and reading the real datasets are one code path.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataFormatError
from ..io import atomic_write_json
from ..data import formats
from ..data.records import CaptionRecord, ConversationRecord, MultipleChoiceRecord, Turn, VQARecord
from .world import Scene, ShapeObject

HUMAN_ANSWERS = 10  # VQA v2 collects ten answers per question; Shapes answers are unanimous


def sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


def write_layouts(out: Path, config, per_split: dict[str, list[dict]]) -> dict[str, dict[str, str]]:
    """Write every split in every layout; returns the manifest's per-split file table."""
    files: dict[str, dict[str, str]] = {}
    karpathy: list[CaptionRecord] = []
    for split, items in per_split.items():
        image_dir = out / "images" / split
        entry = {
            "images": f"images/{split}",
            "scenes": f"scenes/{split}_scenes.json",
            "captions": f"annotations/captions_{split}.json",
            "vqa_questions": f"vqa/shapes_{split}_questions.json",
            "vqa_annotations": f"vqa/shapes_{split}_annotations.json",
            "dialogues": f"dialogues/{split}.json",
        }
        write_scenes(out / entry["scenes"], split, items)
        captions = [
            CaptionRecord(item["image_id"], image_dir / item["file_name"], tuple(item["captions"]), split)
            for item in items
        ]
        karpathy.extend(captions)
        formats.write_coco_captions(out / entry["captions"], captions, image_size=config.image_size,
                                    description=f"Shapes benchmark, {split} split")
        questions = [
            VQARecord(
                question_id=item["image_id"] * 100 + k,
                image_id=item["image_id"],
                image=image_dir / item["file_name"],
                question=sentence_case(q["question"]),
                answers=(q["answer"],) * HUMAN_ANSWERS,
                answer=q["answer"],
                answer_type=q["answer_type"],
                question_type=q["question_type"],
                referents=tuple(tuple(tuple(p) for p in group) for group in q["referents"]),
                evidence=None if q["evidence"] is None else tuple(tuple(p) for p in q["evidence"]),
            )
            for item in items
            for k, q in enumerate(item["questions"])
        ]
        formats.write_vqa(out / entry["vqa_questions"], out / entry["vqa_annotations"], questions,
                          data_type="shapes", data_subtype=split)
        conversations = [
            ConversationRecord(
                id=str(item["image_id"]),
                images=(image_dir / item["file_name"],),
                turns=tuple(
                    turn
                    for k, t in enumerate(item["dialogue"])
                    for turn in (
                        Turn("user", ("<image>\n" if k == 0 else "") + sentence_case(t.question),
                             referents=t.referents, evidence=t.evidence, question_type=t.question_type),
                        Turn("assistant", t.answer),
                    )
                ),
            )
            for item in items
        ]
        formats.write_llava(out / entry["dialogues"], conversations, image_dir=out / "images")
        if any(item["multiple_choice"] for item in items):
            entry["mmmu"] = f"mmmu/Shapes/{split}-00000-of-00001.parquet"
            records = [
                MultipleChoiceRecord(
                    id=f"{split}_Shapes_{item['image_id'] * 10 + k}",
                    question=mc["question"],
                    options=tuple(mc["options"]),
                    answer=mc["answer"],
                    images=(item["png"],),
                    subject="Shapes",
                    subfield=mc["subfield"],
                    question_type="multiple-choice",
                )
                for item in items
                for k, mc in enumerate(item["multiple_choice"])
            ]
            formats.write_mmmu_parquet(out / entry["mmmu"], records)
        files[split] = entry
    formats.write_karpathy(out / "annotations" / "karpathy_shapes.json", karpathy, dataset="shapes",
                           image_root=out / "images")
    return files


def write_scenes(path: Path, split: str, items: list[dict]) -> None:
    """CLEVR-style scene graphs: objects plus, for each relation, who stands in it to whom."""
    scenes = []
    for item in items:
        objects = item["objects"]
        xs = [o["position"][0] for o in objects]
        ys = [o["position"][1] for o in objects]
        n = len(objects)
        scenes.append(
            {
                "split": split,
                "image_index": item["index"],
                "image_id": item["image_id"],
                "image_filename": item["file_name"],
                "objects": objects,
                # relationships[r][i] lists the objects j such that j is r of object i (CLEVR's convention)
                "relationships": {
                    "left": [[j for j in range(n) if xs[j] < xs[i]] for i in range(n)],
                    "right": [[j for j in range(n) if xs[j] > xs[i]] for i in range(n)],
                    "above": [[j for j in range(n) if ys[j] < ys[i]] for i in range(n)],
                    "below": [[j for j in range(n) if ys[j] > ys[i]] for i in range(n)],
                },
            }
        )
    atomic_write_json(path, {"info": {"split": split, "dataset": "shapes"}, "scenes": scenes})


def read_scenes(path: str | Path) -> dict[int, Scene]:
    """Scene graphs by image id, from a scenes file written by `write_scenes`."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        scenes = data["scenes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataFormatError(path, f"not a Shapes scenes file ({exc})") from exc
    out: dict[int, Scene] = {}
    for k, entry in enumerate(scenes):
        try:
            out[entry["image_id"]] = Scene(tuple(ShapeObject.from_json(o) for o in entry["objects"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(path, f"malformed scene ({exc!r})", record=f"scenes[{k}]") from exc
    return out
