"""Training tasks of the dual encoder (contrastive) and the fusion classifier (VQA).

A task builds its tokenizer from the training text and its model from the run's config,
turns example indices into batches, computes the loss and evaluates with the official
metrics; `loop.train` does the rest. Its settings (`task_options` in the run's config) are
its `Options` dataclass. The native LM's task is in vlm_task.py.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.negatives import hard_negative
from ..data.preprocess import ImageProcessor
from ..data.tokenizer import WordTokenizer
from ..data.splits import ImageStore, SplitData
from ..evaluate.harness import evaluate_retrieval, evaluate_vqa, first_images, retrieval_ceiling
from ..loading import load
from ..models.classifier import FusionClassifier, FusionClassifierConfig
from ..models.dual_encoder import DualEncoder, DualEncoderOutput
from ..models.inputs import tokenize
from ..models.losses import world_size
from ..models.pretrained import config_from_dict
from .config import task_options
from .defaults import vqa_recipe


@dataclass
class ImageTaskOptions:
    init_from: str | None = None  # a shipped, saved or Hugging Face model to fine-tune instead of a new one


class _ImageTask:
    """What both tasks share: the tokenizer, the image processor, train and eval image stores."""

    Options = ImageTaskOptions

    @classmethod
    def prepare_data(cls, config) -> None:
        """Before the data is read (on the main process): nothing here; a task over generated data makes it."""

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool):
        self.config = config
        self.options = task_options(config, self.Options)
        self.train_split, self.eval_split = train, evaluation
        self.init_from = getattr(self.options, "init_from", None)
        self.tokenizer = None if self.init_from else WordTokenizer.train(train.texts(), **config.tokenizer)
        self.progress = progress
        self.eval_store: ImageStore | None = None

    def _start_from(self, model_type: str):
        """The model named by task_options.init_from (shipped, saved or Hugging Face), to fine-tune."""
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


@dataclass
class ContrastiveOptions(ImageTaskOptions):
    hard_negatives: bool = False  # NegCLIP: each caption with a few words changed, as an extra negative
    # under torchrun, the loss over every process's images and captions (all-gathered with gradients), as one
    # process would compute it on the whole batch; None: on when more than one process trains
    gather: bool | None = None
    # gathered: each process scores only its own images and captions against all of them (open_clip's
    # local_loss; less compute, the same gradients; the logged loss is then rank 0's share, not the batch's)
    local_loss: bool = False


def contrastive_loss(model: DualEncoder, out: DualEncoderOutput, *, gather: bool | None = None,
                     local_loss: bool = False) -> torch.Tensor:
    """The model's alignment loss (CLIP's InfoNCE or SigLIP's sigmoid, with its learnable temperature) of a
    forward pass: row i of each side a pair, the negatives' embeddings extra texts that match no image.
    `model` may be wrapped in DistributedDataParallel. gather, local_loss: see ContrastiveOptions (gather None:
    on when more than one process trains) and models/losses.gather_batch."""
    criterion = getattr(model, "module", model).criterion  # DDP keeps the model in .module
    candidates = out.text_embeds if out.negative_embeds is None else torch.cat([out.text_embeds, out.negative_embeds])
    gather = world_size() > 1 if gather is None else gather
    if not gather:
        return criterion(out.image_embeds, candidates)
    return criterion(out.image_embeds, candidates, gather=True, local_loss=local_loss)


class ContrastiveTask(_ImageTask):
    """CLIP/SigLIP training on image-caption pairs; evaluated by cross-modal retrieval."""

    name = "contrastive"
    Options = ContrastiveOptions
    model_class = DualEncoder  # a task built on this one may train a subclass

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        super().__init__(config, train, evaluation, progress=progress)
        if not train.captions:
            raise ValueError("the contrastive task needs captions in the training data (COCO captions, Karpathy or a table)")
        if self.init_from:
            self.model = self._start_from("dual_encoder")
        else:
            model_config = config_from_dict(self.model_class.config_class, config.model, source="model")
            model_config.text.vocab_size = self.tokenizer.vocab_size
            self.model = self.model_class(self.configure_model(model_config))
            self._attach(self.model, model_config.vision.image_size)
        self.records = train.captions
        self.hard_negatives = self.options.hard_negatives
        if self.options.local_loss and self.options.gather is False:
            raise ValueError("task_options.local_loss needs gather (every process's rows to score against)")
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
        batch = {"pixels": pixels, "ids": ids, "mask": mask, "examples": len(records), "image_ids": [r.image_id for r in records]}
        if self.hard_negatives:  # NegCLIP: each caption with a few words changed, as an extra negative
            negatives = [n for n in (hard_negative(c, rng) for c in captions) if n is not None]
            if negatives:
                batch["negative_ids"], batch["negative_mask"] = tokenize(self.tokenizer, negatives, text.max_length,
                                                                         padding=text.padding)
        return batch

    def configure_model(self, model_config):
        """The new model's config, filled in from the data where a task built on this one needs it."""
        return model_config

    def forward(self, model, batch: dict) -> DualEncoderOutput:
        return model(batch["pixels"], batch["ids"], batch["mask"], negative_ids=batch.get("negative_ids"),
                     negative_mask=batch.get("negative_mask"))

    def loss(self, model, batch: dict) -> torch.Tensor:
        return contrastive_loss(model, self.forward(model, batch), **self.gathering())

    def gathering(self) -> dict:
        """How the loss spans the processes under torchrun (task_options.gather, local_loss)."""
        gather = world_size() > 1 if self.options.gather is None else self.options.gather
        return {"gather": gather, "local_loss": gather and self.options.local_loss}

    def evaluate(self, model, limit: int) -> dict:
        split = first_images(self.eval_split, limit)
        if self.ceiling is None:  # the same captions every time: the ceiling does not change
            self.ceiling = self.retrieval_ceiling(split)
        store = self._eval_store(split, model)
        return {"retrieval": evaluate_retrieval(model, split.captions, store, ceiling=self.ceiling)}

    def retrieval_ceiling(self, split: SplitData) -> dict:
        """The best text->image R@1 to expect on this split (identical captions of different images)."""
        return retrieval_ceiling(split.captions)

    @staticmethod
    def primary_metric(flat: dict) -> float:
        return (flat.get("t2i_R@1") or 0.0) + (flat.get("i2t_R@1") or 0.0)


@dataclass
class VQAOptions:
    min_answer_count: int = 1  # answers given fewer times in the training data are not among the classes
    max_answers: int = 3129  # at most the most frequent answers (VQA v2's convention: 3,129 answers)
    # Examples are images: a step takes train.batch_size images with their questions, each image encoded
    # once for all of them. False: examples are questions, each with its own copy of its image.
    group_by_image: bool = True
    questions_per_image: int | None = None  # grouped: at most this many of an image's questions per step
    vision_from: str | None = None  # start the encoder from this dual encoder's vision tower (e.g. shapes-clip)
    freeze_vision: bool = False  # keep the (pretrained) encoder as it is


class VQATask(_ImageTask):
    """VQA as classification over the training answers (the fusion classifier).

    By default an example is an image with its questions: the batch holds each image once and
    `image_index` says which image each question asks about, so the encoder runs once per image
    (Shapes has 12 questions per image: the encoder's share of a step falls twelvefold)."""

    name = "vqa"
    Options = VQAOptions
    model_class = FusionClassifier
    chooses_from_data = True  # a config without `model` gets a recipe chosen from the data (defaults.py)

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        super().__init__(config, train, evaluation, progress=progress)
        if not train.vqa:
            raise ValueError("the vqa task needs questions in the training data (VQA v2 files or a table)")
        min_count = self.options.min_answer_count
        counts = Counter(a for r in train.vqa for a in (r.answers or (r.answer,)) if a)
        answers = tuple(sorted(a for a, n in counts.most_common(self.options.max_answers) if n >= min_count))
        if not answers:
            raise ValueError(f"no answer is given at least task_options.min_answer_count = {min_count} times among "
                             f"the task_options.max_answers = {self.options.max_answers} most frequent ones")
        if not config.model:  # the config names only the data: the recipe is chosen from it
            self._choose_recipe(config, train, len(answers), progress=progress)
        model_config: FusionClassifierConfig = config_from_dict(self.model_class.config_class, config.model,
                                                                source="model")
        model_config.text.vocab_size = self.tokenizer.vocab_size
        model_config.answers = answers
        tower = self._tower(model_config) if self.options.vision_from else None
        self.model = self.model_class(model_config)
        self._attach(self.model, model_config.image_size)
        if tower is not None:  # the tower's weights, and the pixels it was trained on
            self.model.vision.load_state_dict(tower.vision.state_dict())
            self.model.image_processor = tower.image_processor
        if self.options.freeze_vision:
            if tower is None:
                raise ValueError("task_options.freeze_vision keeps the encoder fixed, so it needs a trained one: "
                                 "set task_options.vision_from")
            self.model.vision.requires_grad_(False)
        self.answer_index = {a: i for i, a in enumerate(answers)}
        self.records = train.vqa
        self.store = ImageStore([r.image for r in self.records], self.model.image_processor,
                                preload=config.data.preload_images, progress=progress, desc="train images")
        self.record_image = [self.store.position(r.image) for r in self.records]
        self.groups: list[list[int]] = [[] for _ in range(len(self.store))]  # image position -> its records
        for i, position in enumerate(self.record_image):
            self.groups[position].append(i)

    def __len__(self) -> int:
        return len(self.groups) if self.options.group_by_image else len(self.records)

    def _choose_recipe(self, config, train: SplitData, answers: int, *, progress: bool) -> None:
        """Fill in the model, and the train settings the config does not give, from the data; say what was chosen."""
        given = getattr(config, "given_train", frozenset(vars(config.train)))  # a config built in code gives all
        model, schedule = vqa_recipe(train, lambda question: len(self.tokenizer.encode(question)),
                                     steps=config.train.steps if "steps" in given else None,
                                     batch_size=config.train.batch_size if "batch_size" in given else None)
        if torch.cuda.is_available():
            schedule.pop("precision")  # fp32 is what measured fastest on CPUs; on a GPU the config's bf16 is
        if self.options.vision_from:  # the encoder is the tower's
            del model["encoder"], model["cnn"]
        config.model = model
        chosen = {k: v for k, v in schedule.items() if k not in given}
        for key, value in chosen.items():
            setattr(config.train, key, value)
        if progress:
            images = len({r.image for r in train.vqa})
            if "cnn" in model:
                cnn = model["cnn"]
                grid = cnn["image_size"] // math.prod(cnn["strides"])
                encoder = f"{cnn['image_size']} px images, a CNN of {len(cnn['channels'])} stages to a {grid} x {grid} grid"
            else:
                encoder = f"the vision tower of {self.options.vision_from}"
            print(f"vqa: a recipe for {images:,} images, {len(train.vqa):,} questions and {answers:,} answers "
                  f"(config.model not given): {encoder}, {model['fusion']['kind']} fusion, questions up to "
                  f"{model['text']['max_length']} tokens"
                  + ("; train: " + ", ".join(f"{k} {v}" for k, v in chosen.items()) if chosen else ""), flush=True)

    def _tower(self, model_config: FusionClassifierConfig):
        """The dual encoder task_options.vision_from names; model_config takes its ViT's config."""
        tower = load(self.options.vision_from, expect="dual_encoder", needed_by="task_options.vision_from of the vqa task")
        if model_config.encoder != "vit" and "encoder" in self.config.model:
            raise ValueError(f"model.encoder is {model_config.encoder!r} but task_options.vision_from gives a ViT: "
                             "leave model.encoder out")
        model_config.encoder = "vit"
        model_config.vision = tower.vision.config
        return tower

    def targets(self, record) -> torch.Tensor:
        """The share of human answers that gave each answer (VQA's soft labels, normalised)."""
        target = torch.zeros(len(self.answer_index))
        for answer in record.answers or (record.answer,):
            if answer in self.answer_index:
                target[self.answer_index[answer]] += 1
        return target / target.sum().clamp(min=1)

    def make_batch(self, indices: list[int], rng: random.Random) -> dict:
        if not self.options.group_by_image:
            chosen = indices
            positions = [self.record_image[i] for i in chosen]
            image_index = None
        else:  # indices are images: each once in the batch, with (a sample of) its questions
            positions, chosen, rows = indices, [], []
            limit = self.options.questions_per_image
            for row, position in enumerate(positions):
                group = self.groups[position]
                if limit is not None and len(group) > limit:
                    group = rng.sample(group, limit)
                chosen += group
                rows += [row] * len(group)
            image_index = torch.tensor(rows, dtype=torch.long)
        ids, mask = tokenize(self.tokenizer, [self.records[i].question for i in chosen], self.model.config.text.max_length)
        batch = {"pixels": self.store.batch(positions), "ids": ids, "mask": mask,
                 "targets": torch.stack([self.targets(self.records[i]) for i in chosen]), "examples": len(chosen),
                 "images": len(positions)}
        if image_index is not None:
            batch["image_index"] = image_index
        return batch

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(batch["pixels"], batch["ids"], batch["mask"], image_index=batch.get("image_index")).float()
        return -(batch["targets"] * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    def evaluate(self, model, limit: int) -> dict:
        split = first_images(self.eval_split, limit)
        return {"vqa": evaluate_vqa(model, split.vqa, self._eval_store(split, model))}

    @staticmethod
    def primary_metric(flat: dict) -> float:
        return flat.get("vqa") or 0.0
