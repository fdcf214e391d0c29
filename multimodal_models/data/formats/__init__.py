"""Readers and writers for the data formats people already have.

Every reader returns the record types of `multimodal_models.data.records`, never raw dicts,
and validates what it reads: a malformed file raises `DataFormatError` naming the file, the
record (index, and id where there is one) and the field, with what was expected, e.g.

    captions_val2014.json, record annotations[17] (id 48), field 'caption': expected a string, got null

Invalid JSON is reported with its line and column. Readers never open images: images are
referenced by path (or carried as bytes where the format embeds them, as MMMU does).
`check_images=True` verifies that every referenced file exists and names the missing ones.

Formats, one module each (import them from here, e.g. `formats.read_vqa(...)`):
  COCO captions JSON ............ read_coco_captions / write_coco_captions        coco.py
  COCO caption results .......... read_caption_results / write_caption_results    coco.py
  Karpathy split JSON ........... read_karpathy / write_karpathy                  coco.py
                                  (dataset_coco.json, dataset_flickr30k.json)
  VQA v2 questions+annotations .. read_vqa / write_vqa                            vqa.py
                                  (write_vqa_questions, write_vqa_annotations)
  VQA results ................... read_vqa_results / write_vqa_results            vqa.py
  LLaVA conversations ........... read_llava / write_llava (IMAGE_MARKER)         llava.py
  MMMU parquet .................. read_mmmu / write_mmmu_parquet                  mmmu.py
                                  (MMMU_COLUMNS, MMMU_IMAGE_COLUMNS)
  JSONL/CSV next to images ...... read_table / write_table                        table.py

The helpers they share (JSON reading, field checks, image checks, writing) are in `_common.py`.
Writers create parent folders and replace the target file atomically (write, then rename).
"""

from ._common import PathLike
from .coco import (
    read_caption_results,
    read_coco_captions,
    read_karpathy,
    write_caption_results,
    write_coco_captions,
    write_karpathy,
)
from .llava import IMAGE_MARKER, read_llava, write_llava
from .mmmu import MMMU_COLUMNS, MMMU_IMAGE_COLUMNS, read_mmmu, write_mmmu_parquet
from .table import read_table, write_table
from .vqa import (
    read_vqa,
    read_vqa_results,
    write_vqa,
    write_vqa_annotations,
    write_vqa_questions,
    write_vqa_results,
)

__all__ = [
    "IMAGE_MARKER",
    "MMMU_COLUMNS",
    "MMMU_IMAGE_COLUMNS",
    "PathLike",
    "read_caption_results",
    "read_coco_captions",
    "read_karpathy",
    "read_llava",
    "read_mmmu",
    "read_table",
    "read_vqa",
    "read_vqa_results",
    "write_caption_results",
    "write_coco_captions",
    "write_karpathy",
    "write_llava",
    "write_mmmu_parquet",
    "write_table",
    "write_vqa",
    "write_vqa_annotations",
    "write_vqa_questions",
    "write_vqa_results",
]
