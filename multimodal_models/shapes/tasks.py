"""The Shapes training tasks: the general contrastive and VLM tasks, with what scene graphs add.

- "shapes-contrastive" trains a ShapesCLIP: the contrastive loss, plus its object head's loss
  on targets built from the scene graphs (objects.py), and reports the object head's accuracy
  and the retrieval ceiling the scene graphs decide.
- "shapes-vlm" trains a ShapesVLM: the next-token loss, plus grounding_weight x the image
  readers' grounding loss, where the questions' referents say where each head should look
  (grounding.py); it evaluates with the Shapes extras (claim precision, reader grounding).

Both generate the Shapes data into data.root first when it is missing (task_options.generate).
They are reached through registry.TASKS; the general training code never imports them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.splits import SplitData
from ..training.config import task_options
from ..training.tasks import ContrastiveOptions, ContrastiveTask, VQAOptions, VQATask, contrastive_loss
from ..evaluate.harness import first_images
from ..training.vlm_task import VLMOptions, VLMTask, next_token_loss
from .evaluation import CaptionClaims, ObjectHeadAccuracy, scene_ceiling, scenes_of
from .generate import ShapesConfig, generate
from .grounding import Grounding, grounding_loss, grounding_targets
from .models import ShapesCLIP, ShapesVLM
from .objects import SHAPES_ATTRIBUTES, ObjectGrid


class GeneratesShapes:
    """A Shapes task's data: generated into data.root first when it has no dataset.json and
    task_options.generate says how (a mixin before the general task class)."""

    @classmethod
    def prepare_data(cls, config) -> None:
        settings = task_options(config, cls.Options).generate
        if settings is None or config.data.root is None:
            return
        root = Path(config.data.root)
        if not (root / "dataset.json").is_file():
            print(f"generating the Shapes world into {root} ...")
            generate(settings, root)


# --- the generic VQA recipe on Shapes -------------------------------------------------------


@dataclass
class ShapesVQAOptions(VQAOptions):
    generate: ShapesConfig | None = None  # generate the data into data.root when it is missing


class ShapesVQATask(GeneratesShapes, VQATask):
    """The general `vqa` task on the Shapes world: the data is generated first when it is missing,
    and nothing else of the world is read (no scene graphs, no grounding): images, questions and
    answers only, as a user's table would give them."""

    name = "shapes-vqa"
    Options = ShapesVQAOptions


# --- the dual encoder ------------------------------------------------------------------------


@dataclass
class ShapesContrastiveOptions(ContrastiveOptions):
    generate: ShapesConfig | None = None  # generate the data into data.root when it is missing


class ShapesContrastiveTask(GeneratesShapes, ContrastiveTask):
    """Contrastive training of a ShapesCLIP, with its object head trained on the scene graphs."""

    name = "shapes-contrastive"
    Options = ShapesContrastiveOptions
    model_class = ShapesCLIP

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        super().__init__(config, train, evaluation, progress=progress)
        self.objects = None
        if getattr(self.model, "object_head", None) is not None:  # dense supervision of the patch tokens
            self.objects = ObjectGrid.for_model(self.model, scenes_of(train))

    def configure_model(self, model_config):
        if model_config.object_head is not None and not model_config.object_head.attributes:
            model_config.object_head.attributes = SHAPES_ATTRIBUTES
        return model_config

    def loss(self, model, batch: dict) -> torch.Tensor:
        out = self.forward(model, batch)
        loss = contrastive_loss(model, out, **self.gathering())
        if self.objects is not None:
            targets = self.objects.batch(batch["image_ids"])
            inner = getattr(model, "module", model)  # under torchrun, the model inside DistributedDataParallel
            loss = loss + inner.object_head.loss(inner.grid_tokens(out.image_tokens), targets)
        return loss

    def retrieval_ceiling(self, split: SplitData) -> dict:
        return scene_ceiling(split) or super().retrieval_ceiling(split)

    def evaluate(self, model, limit: int) -> dict:
        results = super().evaluate(model, limit)
        split = first_images(self.eval_split, limit)  # how well the patch tokens name the objects, per attribute
        ObjectHeadAccuracy().run(model, split, self._eval_store(split, model), results)
        return results


# --- the multimodal LM -----------------------------------------------------------------------


@dataclass
class ShapesVLMOptions(VLMOptions):
    # weight of the image readers' grounding loss, where questions carry referents (0: off)
    grounding_weight: float = 1.0
    # whether the counting readers' heads learn which objects beat their sink (how many); "numbers": the
    # evidence head only where the answer is how many
    exact_grounding: bool | str = False
    generate: ShapesConfig | None = None  # generate the data into data.root when it is missing


class ShapesVLMTask(GeneratesShapes, VLMTask):
    """The VLM task, with the image readers' attention supervised by the questions' referents."""

    name = "shapes-vlm"
    Options = ShapesVLMOptions
    model_class = ShapesVLM

    def __init__(self, config, train: SplitData, evaluation: SplitData, *, progress: bool = True):
        options = task_options(config, self.Options)
        if options.exact_grounding not in (False, True, "numbers"):
            raise ValueError(f"task_options.exact_grounding: expected true, false or 'numbers', "
                             f"got {options.exact_grounding!r}")
        super().__init__(config, train, evaluation, progress=progress)
        self.grounding_weight = options.grounding_weight
        self.exact_grounding = bool(options.exact_grounding)
        self.counted_evidence_only = options.exact_grounding == "numbers"
        readers = getattr(self.model, "readers", ())
        # the image readers learn where to look from the questions' referents
        self.supervise_grounding = self.grounding_weight > 0 and len(readers) > 0
        # (reader, head) of the heads that count: exact grounding teaches them how many
        self.exact_heads = frozenset((i, head) for i, r in enumerate(readers)
                                     for head in r.counting_heads) if self.exact_grounding else frozenset()
        if self.exact_grounding and not (self.supervise_grounding and self.exact_heads):
            raise ValueError("task_options.exact_grounding trains which objects beat each counting reader head's sink: "
                             "it needs model.image_reader_sink and image_reader_counts (and grounding_weight > 0)")
        grounded = any(q.annotation for u in self.units for q in u.qa) or any(any(a) for u in self.units for _, a in u.chats)
        if self.supervise_grounding and not grounded:
            warnings.warn("the model has image readers but no training question carries referents, so nothing "
                          "teaches them where to look; regenerate Shapes data written before grounding annotations "
                          "(multimodal shapes generate) or add 'referents' to the VQA annotations", stacklevel=2)

    def configure_model(self, model_config, tower):
        if model_config.image_tokens != "objects":
            return model_config
        if tower is None:
            raise ValueError("model.image_tokens 'objects' needs a trained object head to choose the objects: set "
                             "task_options.vision_from to a dual encoder trained with model.object_head")
        if getattr(tower, "object_head", None) is None:
            raise ValueError(f"model.image_tokens 'objects' needs a vision tower with an object head, and "
                             f"{self.options.vision_from} has none: train the dual encoder with model.object_head")
        model_config.object_head = tower.object_head.config
        return model_config

    def copy_tower(self, model, tower) -> None:
        super().copy_tower(model, tower)
        if model.objects is not None:
            model.objects.head.load_state_dict(tower.object_head.state_dict())

    def annotation(self, item, answer: str) -> Grounding | None:
        return Grounding.of(item, answer)

    def add_targets(self, batch: dict, rows: list) -> None:
        if self.supervise_grounding:
            batch["grounding"] = grounding_targets(
                rows, len(self.model.readers), self.model.config.image_reader_heads, exact_heads=self.exact_heads,
                counted_evidence_only=self.counted_evidence_only, exact=self.exact_grounding)

    def loss(self, model, batch: dict, *, targets_only: bool = True) -> torch.Tensor:
        """The next-token loss, plus grounding_weight x the image readers' grounding loss."""
        out, targets = self.forward(model, batch, targets_only=targets_only)
        loss = next_token_loss(out.logits, batch["labels"], targets, targets_only=targets_only)
        grounding = batch.get("grounding")
        if grounding is None or out.hook is None:
            return loss
        centres, present = model.object_places(out.hook)
        ground = grounding_loss(out.hook.logits, centres, present, grounding.to(batch["ids"].device))
        return loss if ground is None else loss + self.grounding_weight * ground

    def evaluation_extras(self) -> tuple:
        return (CaptionClaims(),)  # where its readers look is measured by `multimodal evaluate`
