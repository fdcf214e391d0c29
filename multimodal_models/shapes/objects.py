"""Targets of the object head (models/object_head.py) from the Shapes scene graphs.

The image is cut into the vision tower's grid of patches; the object whose centre falls in
a cell is that cell's target: present, its centre (fractions of the image side), and the
index of each of its attributes. Shapes objects keep a gap larger than a cell of an 8x8 grid
between their centres, so a cell holds at most one; should two centres share a cell, the
larger object is the target.
"""

from __future__ import annotations

import torch

from .world import COLORS, SHAPES, SIZES
from .object_head import ObjectTargets

SHAPES_ATTRIBUTES: dict[str, list[str]] = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}


class ObjectGrid:
    """Builds ObjectTargets for batches of images, by image id, on a grid x grid patch layout."""

    def __init__(self, scenes: dict | None, grid: int, attributes: dict[str, list[str]] = SHAPES_ATTRIBUTES):
        if not scenes:
            raise ValueError("the object head needs object annotations: a Shapes 'scenes' file for the training "
                             "split (data.root with a dataset.json that lists one, or data.train.scenes)")
        self.scenes = scenes
        self.grid = grid
        self.index = {name: {value: i for i, value in enumerate(values)} for name, values in attributes.items()}
        self._cache: dict = {}

    @classmethod
    def for_model(cls, model, scenes: dict | None) -> ObjectGrid:
        """The targets of a dual encoder's object head: its grid, its attribute vocabularies."""
        return cls(scenes, model.config.vision.grid, model.config.object_head.attributes)

    def targets(self, image_id) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if image_id in self._cache:
            return self._cache[image_id]
        if image_id not in self.scenes:
            raise ValueError(f"image {image_id!r} has no scene graph in the scenes file: the object head needs one "
                             "for every training image")
        g, cells = self.grid, self.grid * self.grid
        present = torch.zeros(cells)
        position = torch.zeros(cells, 2)
        labels = torch.full((cells, len(self.index)), -100, dtype=torch.long)
        for obj in sorted(self.scenes[image_id].objects, key=lambda o: o.radius):  # larger ones win a shared cell
            column, row = min(int(obj.x * g), g - 1), min(int(obj.y * g), g - 1)
            cell = row * g + column
            present[cell] = 1.0
            position[cell] = torch.tensor([obj.x, obj.y])
            for k, (name, values) in enumerate(self.index.items()):
                value = getattr(obj, name)
                if value not in values:
                    raise ValueError(f"image {image_id!r}: object {name} {value!r} is not one of {list(values)}")
                labels[cell, k] = values[value]
        self._cache[image_id] = (present, position, labels)
        return self._cache[image_id]

    def batch(self, image_ids: list) -> ObjectTargets:
        present, position, labels = zip(*(self.targets(i) for i in image_ids))
        return ObjectTargets(torch.stack(present), torch.stack(position), torch.stack(labels))
