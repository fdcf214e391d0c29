"""Dense object supervision for a vision tower: every patch token names the object centred in it.

Contrastive training gives the vision tower one signal per image: its pooled vector should
match the caption. The per-patch tokens that a language model later reads get no direct
signal, and on small scenes they learn slowly what each object is (DEVELOPERS.md). When the
training data comes with object annotations (the Shapes scene graphs), this head adds one:
for each cell of the patch grid it predicts whether an object's centre falls in the cell,
where that centre is in the image, and each of the object's attributes (shape, colour,
size, ...), in the spirit of grid detectors (YOLO) and of region-level pretraining of VLM
vision towers. The position is the image's, not the cell's: a token then says linearly
where its object is, which questions about left/right/nearest read off.

The head is a few linear layers on the tokens; the targets are built by
`multimodal_models.training.objects` from the scene graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ObjectHeadConfig:
    # attribute name -> its values, in label order (filled in by the training task from the data)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    weight: float = 1.0  # its loss is added to the model's own, times this


class ObjectTargets(NamedTuple):
    """What the head should predict for a batch, one row per image, one column per grid cell."""

    present: torch.Tensor  # (B, N) float: 1 where an object's centre falls in the cell
    position: torch.Tensor  # (B, N, 2) the object's centre (x, y) as fractions of the image side
    labels: torch.Tensor  # (B, N, A) long: the attribute values' indices; -100 where no object


class ObjectHead(nn.Module):
    def __init__(self, width: int, config: ObjectHeadConfig):
        super().__init__()
        if not config.attributes:
            raise ValueError("object_head needs at least one attribute (name -> list of values)")
        self.config = config
        self.objectness = nn.Linear(width, 1)
        self.position = nn.Linear(width, 2)
        self.attributes = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in config.attributes.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens (B, N, C), one per grid cell -> logits: objectness (B, N), position (B, N, 2), one per attribute."""
        out = {"objectness": self.objectness(tokens).squeeze(-1), "position": self.position(tokens)}
        out.update({name: layer(tokens) for name, layer in self.attributes.items()})
        return out

    def loss(self, tokens: torch.Tensor, targets: ObjectTargets) -> torch.Tensor:
        """Objectness (binary cross-entropy over all cells) + attributes (cross-entropy) + centre
        position (L1 of the sigmoid), the last two over the cells that hold an object; times config.weight."""
        predicted = self(tokens.float())
        loss = F.binary_cross_entropy_with_logits(predicted["objectness"], targets.present)
        cells = targets.present.bool()
        if cells.any():
            loss = loss + F.l1_loss(torch.sigmoid(predicted["position"][cells]), targets.position[cells])
            for index, name in enumerate(self.config.attributes):
                loss = loss + F.cross_entropy(predicted[name][cells], targets.labels[..., index][cells])
        return self.config.weight * loss

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, targets: ObjectTargets) -> dict[str, float]:
        """Per attribute, the share of object cells whose value is predicted right; and the share of
        cells whose objectness is right (threshold 0.5)."""
        predicted = self(tokens.float())
        cells = targets.present.bool()
        scores = {"objectness": float(((predicted["objectness"] > 0) == cells).float().mean())}
        for index, name in enumerate(self.config.attributes):
            right = predicted[name][cells].argmax(-1) == targets.labels[..., index][cells]
            scores[name] = float(right.float().mean()) if cells.any() else 0.0
        return scores


class ObjectSlots(nn.Module):
    """One image token per object, for a language model that reads objects rather than a grid.

    The object head rates every cell of the patch grid; the `slots` cells most likely to hold
    an object's centre are kept, in the spirit of the region features of bottom-up attention
    (Anderson et al., 2018) and of object-centric VLMs. Each slot is its patch token followed by
    the head's reading of it: objectness, centre (x, y) and each attribute's probabilities, and
    with `frequencies` > 0 the centre again as sines and cosines of pi * 2^k * (x, y),
    k < frequencies (NeRF / DETR style), which a decoder compares and measures more readily.
    Slots are ordered left to right by their predicted centre, the empty ones (objectness
    below one half) after them, so the decoder sees a scene's objects as a short list. With
    `slots` at least the largest number of objects in a scene, no object is left out, unless
    two share a grid cell (the head names the larger one there).
    """

    def __init__(self, width: int, config: ObjectHeadConfig, slots: int, frequencies: int = 0):
        super().__init__()
        if slots < 1:
            raise ValueError(f"object_slots must be at least 1, got {slots}")
        self.head = ObjectHead(width, config)
        self.slots = slots
        self.register_buffer("frequencies", torch.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        self.token_width = width
        self.width = width + 3 + sum(len(values) for values in config.attributes.values()) + 4 * frequencies

    def places(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (..., self.width) -> each slot's centre (..., 2) and whether it holds an object (...)."""
        C = self.token_width  # a slot: patch token, objectness, centre (x, y), attributes, sines
        return slots[..., C + 1:C + 3], slots[..., C] > 0.5

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C), one per grid cell -> slots (B, slots, self.width)."""
        _, N, C = tokens.shape
        if self.slots > N:
            raise ValueError(f"object_slots is {self.slots} but the vision grid has only {N} cells")
        predicted = self.head(tokens)
        objectness = predicted["objectness"]
        centre = torch.sigmoid(predicted["position"])
        angles = (centre[..., None] * self.frequencies).flatten(-2)  # (B, N, 2 * frequencies)
        readings = torch.cat([tokens, torch.sigmoid(objectness)[..., None], centre]
                             + [predicted[name].softmax(-1) for name in self.head.config.attributes]
                             + [angles.sin(), angles.cos()], dim=-1)
        kept = objectness.topk(self.slots, dim=1).indices
        slots = readings.gather(1, kept[..., None].expand(-1, -1, readings.shape[-1]))
        objectness, x = slots[..., C], slots[..., C + 1]
        order = torch.where(objectness > 0.5, x, 2.0 - objectness).argsort(dim=1)  # objects by x, then empties
        return slots.gather(1, order[..., None].expand_as(slots))
