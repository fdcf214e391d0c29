"""Distillation in the Shapes world: the Shapes tasks, their students taught by a trained teacher.

- "shapes-distill-contrastive": a ShapesCLIP student learns from a dual encoder teacher (e.g.
  the shipped shapes-clip) by similarity distillation and embedding regression
  (training/distill.py), besides the shapes-contrastive task's own losses (contrastive, object
  head); evaluated as shapes-contrastive is.
- "shapes-distill-vlm": a ShapesVLM student learns from a VLM teacher (e.g. the shipped
  shapes-vlm) token by token, besides the shapes-vlm task's own losses (next token, grounding);
  evaluated as shapes-vlm is.

configs/shapes-clip-small.yaml and configs/shapes-vlm-small.yaml are the shipped students'.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training.distill import DistillFields, DistillsDualEncoder, DistillsVLM, DualEncoderDistillFields
from .tasks import ShapesContrastiveOptions, ShapesContrastiveTask, ShapesVLMOptions, ShapesVLMTask


@dataclass
class ShapesDistillContrastiveOptions(ShapesContrastiveOptions, DualEncoderDistillFields):
    pass


class ShapesDistillContrastiveTask(DistillsDualEncoder, ShapesContrastiveTask):
    name = "shapes-distill-contrastive"
    Options = ShapesDistillContrastiveOptions


@dataclass
class ShapesDistillVLMOptions(ShapesVLMOptions, DistillFields):
    pass


class ShapesDistillVLMTask(DistillsVLM, ShapesVLMTask):
    name = "shapes-distill-vlm"
    Options = ShapesDistillVLMOptions
