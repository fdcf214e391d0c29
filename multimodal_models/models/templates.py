"""The CLIP paper's zero-shot prompt templates for ImageNet, read from clip_imagenet_templates.json.

CLIP_IMAGENET_TEMPLATES: all 80 (the paper's prompt ensemble); CLIP_IMAGENET_TEMPLATES_7: the 7
that sequential forward selection kept (a little better than all 80 for small models).
Each is formatted with str.format: "{}" is where the label goes.
"""

from __future__ import annotations

import json
from pathlib import Path

_DATA = json.loads(Path(__file__).with_name("clip_imagenet_templates.json").read_text(encoding="utf-8"))

CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(_DATA["templates"])
CLIP_IMAGENET_TEMPLATES_7: tuple[str, ...] = tuple(_DATA["selected"])
