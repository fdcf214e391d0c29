"""Training tasks of the dual encoder (contrastive) and the fusion classifier (VQA).

A task builds its tokenizer from the training text and its model from the run's config,
turns example indices into batches, computes the loss and evaluates with the official
metrics; `loop.train` does the rest. The native LM's task is in vlm_task.py.
"""

from __future__ import annotations

import random
from collections import Counter

import torch
import torch.nn.functional as F

from ..data.negatives import hard_negative
from ..data.preprocess import ImageProcessor
from ..data.tokenizer import WordTokenizer
from ..evaluate.harness import evaluate_retrieval, evaluate_vqa, first_images, object_accuracy, retrieval_ceiling
from ..models.classifier import FusionClassifier, FusionClassifierConfig
from ..models.dual_encoder import DualEncoder, DualEncoderConfig
from ..models.inputs import tokenize
from ..models.pretrained import config_from_dict
from ..data.splits import ImageStore, SplitData
from .objects import SHAPES_ATTRIBUTES, ObjectGrid


class _ImageTask:
    """What both tasks share: the tokenizer, the image processor, train and eval image stores."""

    OPTIONS: tuple[str, ...] = ("init_from",)

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool):
        self.config = config
        self.train_split, self.eval_split = train, evaluation
        unknown = set(config.task_options) - set(self.OPTIONS)
        if unknown:
            raise ValueError(f"unknown task_options for the {config.task} task: {sorted(unknown)}; known: {list(self.OPTIONS)}")
        self.init_from = config.task_options.get("init_from")
        self.tokenizer = None if self.init_from else WordTokenizer.train(train.texts(), **config.tokenizer)
        self.progress = progress
        self.eval_store: ImageStore | None = None

    def _start_from(self, model_type: str):
        """The model named by task_options.init_from (shipped, saved or Hugging Face), to fine-tune."""
        from ..loading import load

        model = load(self.init_from, expect=model_type, needed_by="task_options.init_from of this task")
        self.tokenizer = model.tokenizer
        return model

    def _attach(self, model, image_size: int) -> None:
        model.tokenizer = self.tokenizer
        model.image_processor = ImageProcessor(size={"height": image_size, "width": image_size})

    def _eval_store(self, split: SplitData, model) -> ImageStore:
        if self.eval_store is None:  # the same images at every evaluation: decode them once
            sources = [r.image for r in split.captions] + [r.image for r in split.vqa]
            self.eval_store = ImageStore(sources, model.image_processor, progress=False)
        return self.eval_store


class ContrastiveTask(_ImageTask):
    """CLIP/SigLIP training on image-caption pairs; evaluated by cross-modal retrieval."""

    name = "contrastive"
    OPTIONS = ("init_from", "hard_negatives")

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        super().__init__(config, train, evaluation, progress=progress)
        if not train.captions:
            raise ValueError("the contrastive task needs captions in the training data (COCO captions, Karpathy or a table)")
        if self.init_from:
            self.model = self._start_from("dual_encoder")
        else:
            model_config: DualEncoderConfig = config_from_dict(DualEncoderConfig, config.model, source="model")
            model_config.text.vocab_size = self.tokenizer.vocab_size
            if model_config.object_head is not None and not model_config.object_head.attributes:
                model_config.object_head.attributes = SHAPES_ATTRIBUTES
            self.model = DualEncoder(model_config)
            self._attach(self.model, model_config.vision.image_size)
        self.records = train.captions
        self.objects = self.eval_objects = None
        if self.model.object_head is not None:  # dense supervision of the patch tokens from the scene graphs
            self.objects = ObjectGrid.for_model(self.model, train.scenes)
            self.eval_objects = ObjectGrid.for_model(self.model, evaluation.scenes) if evaluation.scenes else None
        self.hard_negatives = bool(config.task_options.get("hard_negatives", False))
        self.ceiling: dict | None = None
        self.store = ImageStore([r.image for r in self.records], self.model.image_processor,
                                preload=config.data.preload_images, progress=progress, desc="train images")

    def __len__(self) -> int:
        return len(self.records)

    def make_batch(self, indices: list[int], rng: random.Random) -> dict:
        records = [self.records[i] for i in indices]
        captions = [rng.choice(r.captions) for r in records]
        text = self.model.config.text
        ids, mask = tokenize(self.tokenizer, captions, text.max_length, padding=text.padding)
        pixels = self.store.batch([self.store.position(r.image) for r in records])
        batch = {"pixels": pixels, "ids": ids, "mask": mask, "examples": len(records)}
        if self.objects is not None:
            batch["objects"] = self.objects.batch([r.image_id for r in records])
        if self.hard_negatives:  # NegCLIP: each caption with a few words changed, as an extra negative
            negatives = [n for n in (hard_negative(c, rng) for c in captions) if n is not None]
            if negatives:
                batch["negative_ids"], batch["negative_mask"] = tokenize(self.tokenizer, negatives, text.max_length,
                                                                         padding=text.padding)
        return batch

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        return model(batch["pixels"], batch["ids"], batch["mask"], negative_ids=batch.get("negative_ids"),
                     negative_mask=batch.get("negative_mask"), objects=batch.get("objects")).loss

    def evaluate(self, model, limit: int) -> dict:
        split = first_images(self.eval_split, limit)
        if self.ceiling is None:  # the same captions every time: the ceiling does not change
            self.ceiling = retrieval_ceiling(split.captions, split.scenes)
        store = self._eval_store(split, model)
        results = {"retrieval": evaluate_retrieval(model, split.captions, store, scenes=split.scenes, ceiling=self.ceiling)}
        if self.eval_objects is not None:  # how well the patch tokens name the objects, per attribute
            results["objects"] = object_accuracy(model, split.captions, store, self.eval_objects)
        return results

    @staticmethod
    def primary_metric(flat: dict) -> float:
        return (flat.get("t2i_R@1") or 0.0) + (flat.get("i2t_R@1") or 0.0)


class VQATask(_ImageTask):
    """VQA as classification over the training answers (the fusion classifier)."""

    name = "vqa"

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        super().__init__(config, train, evaluation, progress=progress)
        if not train.vqa:
            raise ValueError("the vqa task needs questions in the training data (VQA v2 files or a table)")
        min_count = config.task_options.get("min_answer_count", 1)
        counts = Counter(a for r in train.vqa for a in (r.answers or (r.answer,)) if a)
        answers = tuple(sorted(a for a, n in counts.items() if n >= min_count))
        model_config: FusionClassifierConfig = config_from_dict(FusionClassifierConfig, config.model, source="model")
        model_config.text.vocab_size = self.tokenizer.vocab_size
        model_config.answers = answers
        self.model = FusionClassifier(model_config)
        self._attach(self.model, model_config.vision.image_size)
        self.answer_index = {a: i for i, a in enumerate(answers)}
        self.records = train.vqa
        self.store = ImageStore([r.image for r in self.records], self.model.image_processor,
                                preload=config.data.preload_images, progress=progress, desc="train images")

    def __len__(self) -> int:
        return len(self.records)

    def targets(self, record) -> torch.Tensor:
        """The share of human answers that gave each answer (VQA's soft labels, normalised)."""
        target = torch.zeros(len(self.answer_index))
        for answer in record.answers or (record.answer,):
            if answer in self.answer_index:
                target[self.answer_index[answer]] += 1
        return target / target.sum().clamp(min=1)

    def make_batch(self, indices: list[int], rng: random.Random) -> dict:
        records = [self.records[i] for i in indices]
        ids, mask = tokenize(self.tokenizer, [r.question for r in records], self.model.config.text.max_length)
        pixels = self.store.batch([self.store.position(r.image) for r in records])
        targets = torch.stack([self.targets(r) for r in records])
        return {"pixels": pixels, "ids": ids, "mask": mask, "targets": targets, "examples": len(records)}

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        logits = model(batch["pixels"], batch["ids"], batch["mask"]).float()
        return -(batch["targets"] * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    def evaluate(self, model, limit: int) -> dict:
        split = first_images(self.eval_split, limit)
        return {"vqa": evaluate_vqa(model, split.vqa, self._eval_store(split, model))}

    @staticmethod
    def primary_metric(flat: dict) -> float:
        return flat.get("vqa") or 0.0
