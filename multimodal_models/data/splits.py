"""The data of a split, as training and evaluation read it: its records, and its images decoded once.

A split is described by a DataConfig: a dataset folder with a dataset.json manifest (the
Shapes world writes one; you can write one for COCO), explicit files, or both. Every file
goes through the readers of `multimodal_models.data.formats`, so a run trains on COCO
captions, VQA v2, LLaVA conversations or a plain JSONL the same way. Files that no reader
here knows (a split's scene graphs, say) stay named in `SplitData.files` for the code
that reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import formats
from .preprocess import ImageProcessor
from .records import CaptionRecord, ConversationRecord, ImageSource, MultipleChoiceRecord, VQARecord


@dataclass
class SplitFiles:
    """Annotation files of one split; paths are relative to DataConfig.root when it is set."""

    images: str | None = None  # image folder the annotation files refer into
    captions: str | None = None  # COCO captions JSON
    karpathy: str | None = None  # Karpathy split JSON (with karpathy_split naming the split)
    karpathy_split: str | None = None
    vqa_questions: str | None = None  # VQA v2 questions JSON
    vqa_annotations: str | None = None  # VQA v2 annotations JSON
    dialogues: str | None = None  # LLaVA conversation JSON / JSONL
    table: str | None = None  # plain JSONL / CSV next to an image folder
    scenes: str | None = None  # scene graphs (CLEVR-like JSON; read by the code that uses them, e.g. Shapes)
    mmmu: str | None = None  # MMMU-layout parquet file or folder (multiple-choice evaluation)
    mmmu_split: str | None = None  # which of a folder's MMMU files: dev | validation (default) | test


@dataclass
class DataConfig:
    root: str | None = None  # a dataset folder with dataset.json (Shapes writes one)
    train_split: str = "train"  # split names in dataset.json
    eval_split: str = "val"
    train: SplitFiles | None = None  # explicit files instead of (or on top of) dataset.json
    eval: SplitFiles | None = None
    preload_images: bool = True  # decode and resize every image once, keep them in memory as uint8
    # the share of the training split's images to train on, each with all its records; chosen by a hash
    # of the image's name, so smaller shares are inside larger ones, the same on every machine
    train_fraction: float = 1.0


@dataclass
class SplitData:
    name: str
    captions: list[CaptionRecord] = field(default_factory=list)
    vqa: list[VQARecord] = field(default_factory=list)
    conversations: list[ConversationRecord] = field(default_factory=list)
    multiple_choice: list[MultipleChoiceRecord] = field(default_factory=list)
    files: SplitFiles | None = None  # the files it was read from

    def texts(self) -> list[str]:
        """Every piece of text in the split (to build a vocabulary)."""
        out = [c for r in self.captions for c in r.captions]
        out += [t for r in self.vqa for t in (r.question, *(r.answers or ((r.answer,) if r.answer else ())))]
        out += [turn.text for r in self.conversations for turn in r.turns]
        return out

    def is_empty(self) -> bool:
        return not (self.captions or self.vqa or self.conversations or self.multiple_choice)


def split_files(data: DataConfig, which: str) -> SplitFiles:
    """The files of the 'train' or 'eval' split: manifest entries, overridden by explicit ones."""
    base = SplitFiles()
    root = Path(data.root) if data.root else None
    if root is not None and (root / "dataset.json").is_file():
        manifest = json.loads((root / "dataset.json").read_text())
        name = data.train_split if which == "train" else data.eval_split
        if name not in manifest.get("splits", {}):
            raise ValueError(f"{root}/dataset.json has no split {name!r}; it has {sorted(manifest.get('splits', {}))}")
        known = {f.name for f in fields(SplitFiles)}
        base = SplitFiles(**{k: v for k, v in manifest["splits"][name].items() if k in known})
    explicit = data.train if which == "train" else data.eval
    merged = {k: v for k, v in asdict(base).items()}
    if explicit is not None:
        merged.update({k: v for k, v in asdict(explicit).items() if v is not None})
    if root is not None:
        merged = {k: (str(root / v) if v is not None and k not in ("karpathy_split", "mmmu_split") else v)
                  for k, v in merged.items()}
    return SplitFiles(**merged)


def load_split(data: DataConfig, which: str) -> SplitData:
    check_train_fraction(data.train_fraction)
    files = split_files(data, which)
    images = Path(files.images) if files.images else None
    split = SplitData(name=which, files=files)
    if files.captions:
        split.captions = formats.read_coco_captions(files.captions, image_dir=images or Path(files.captions).parent)
    elif files.karpathy:
        split.captions = formats.read_karpathy(files.karpathy, image_root=images or Path(files.karpathy).parent,
                                               split=files.karpathy_split)
    if files.vqa_questions:
        split.vqa = formats.read_vqa(files.vqa_questions, files.vqa_annotations, image_dir=images)
    if files.dialogues:
        root = images.parent if images is not None else Path(files.dialogues).parent
        split.conversations = formats.read_llava(files.dialogues, image_dir=root)
    if files.table:
        rows = formats.read_table(files.table, image_dir=images)
        if rows and isinstance(rows[0], VQARecord):
            split.vqa += rows
        else:
            split.captions += rows
    if files.mmmu:
        split.multiple_choice = formats.read_mmmu(files.mmmu, split=files.mmmu_split or "validation")
    if split.is_empty():
        raise ValueError(f"the {which} split has no captions, questions or conversations: check data in the config")
    if which == "train" and data.train_fraction < 1:  # the eval split is always whole
        split = keep_share(split, data.train_fraction, images=images)
    return split


def check_train_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"data.train_fraction: expected a share in (0, 1], got {fraction!r}")


def keep_share(split: SplitData, fraction: float, *, images: Path | None = None) -> SplitData:
    """The part of a split about `fraction` of its images (at least one), with every record about them.

    An image is kept when a hash of its name, as a number in [0, 1), is below `fraction`: its own
    name decides, not the other images, so a smaller share is inside every larger one, and the
    name is taken relative to the split's image folder (`images`), not from the absolute path, so
    the same data set gives the same images wherever it lies (bytes: their content). A record
    about several images is kept when all of them are; one about no image (a text-only chat) is
    kept: it is no image-text pair."""
    sources = [r.image for r in split.captions] + [r.image for r in split.vqa]
    sources += [s for r in split.conversations for s in r.images] + [s for r in split.multiple_choice for s in r.images]
    draws = {image_key(s): _draw(s, images) for s in sources}
    keep = {key for key, (draw, _) in draws.items() if draw < fraction}
    if not keep and draws:  # a share too small for this split: its first image in the hash order
        keep = {min(draws, key=draws.__getitem__)}

    def kept(record_images) -> bool:
        return all(image_key(s) in keep for s in record_images)

    return SplitData(
        name=split.name,
        captions=[r for r in split.captions if kept((r.image,))],
        vqa=[r for r in split.vqa if kept((r.image,))],
        conversations=[r for r in split.conversations if kept(r.images)],
        multiple_choice=[r for r in split.multiple_choice if kept(r.images)],
        files=split.files,
    )


def _draw(source: ImageSource, images: Path | None) -> tuple[float, str]:
    """An image's number in [0, 1) for keep_share, from its portable name (ties: the name itself).

    Images outside the split's image folder are named by their folder and file name."""
    name = image_key(source)
    if not isinstance(source, bytes):
        path = Path(source)
        inside = images is not None and path.is_relative_to(images)
        name = path.relative_to(images).as_posix() if inside else Path(*path.parts[-2:]).as_posix()
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, name


def image_key(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return "sha1:" + hashlib.sha1(source).hexdigest()
    return str(Path(source))


class ImageStore:
    """The images of a split, preprocessed once to uint8 (N, H, W, 3) and normalised per batch.

    `normalize_batch` of the model's ImageProcessor finishes the job, giving exactly the
    pixels inference computes from the same file.
    """

    def __init__(self, sources: list[ImageSource], processor: ImageProcessor, *, preload: bool = True,
                 progress: bool = True, desc: str = "images"):
        self.processor = processor
        self.sources: list[ImageSource] = []
        self.index: dict[str, int] = {}
        for source in sources:
            key = image_key(source)
            if key not in self.index:
                self.index[key] = len(self.sources)
                self.sources.append(source)
        self.pixels: torch.Tensor | None = None
        if preload and self.sources:
            arrays = [processor.resize_to_array(s) for s in tqdm(self.sources, desc=desc, disable=not progress, leave=False)]
            self.pixels = torch.from_numpy(np.stack(arrays))

    def __len__(self) -> int:
        return len(self.sources)

    def position(self, source: ImageSource) -> int:
        return self.index[image_key(source)]

    def batch(self, positions: list[int]) -> torch.Tensor:
        """Normalised float32 (B, 3, H, W) pixels of the images at these positions."""
        if self.pixels is not None:
            raw = self.pixels[torch.as_tensor(positions, dtype=torch.long)]
        else:
            raw = torch.from_numpy(np.stack([self.processor.resize_to_array(self.sources[p]) for p in positions]))
        return self.processor.normalize_batch(raw)
