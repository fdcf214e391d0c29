"""The one table of names: the model types this package saves and the training tasks.

A saved model's config.json names its class by "model_type"; a training config names its
task by "task". Each name maps to "module:Class", imported when first asked for (as
transformers' auto classes do), so the general layers can load a Shapes model or run a
Shapes task without importing the Shapes area: the worked example in
`multimodal_models.shapes` adds its entries here and nowhere else.
"""

from __future__ import annotations

import importlib

MODEL_TYPES: dict[str, str] = {
    "dual_encoder": "multimodal_models.models.dual_encoder:DualEncoder",
    "audio_text": "multimodal_models.models.audio_text:AudioTextEncoder",
    "speech_to_text": "multimodal_models.models.speech:SpeechToText",
    "fusion_classifier": "multimodal_models.models.classifier:FusionClassifier",
    "vlm": "multimodal_models.models.vlm:VisionLanguageModel",
    "shapes_clip": "multimodal_models.shapes.models:ShapesCLIP",
    "shapes_vlm": "multimodal_models.shapes.models:ShapesVLM",
}

TASKS: dict[str, str] = {
    "contrastive": "multimodal_models.training.tasks:ContrastiveTask",
    "vqa": "multimodal_models.training.tasks:VQATask",
    "vlm": "multimodal_models.training.vlm_task:VLMTask",
    "distill-contrastive": "multimodal_models.training.distill:DistillContrastiveTask",
    "distill-vlm": "multimodal_models.training.distill:DistillVLMTask",
    "shapes-contrastive": "multimodal_models.shapes.tasks:ShapesContrastiveTask",
    "shapes-vqa": "multimodal_models.shapes.tasks:ShapesVQATask",
    "shapes-vlm": "multimodal_models.shapes.tasks:ShapesVLMTask",
    "shapes-distill-contrastive": "multimodal_models.shapes.distill:ShapesDistillContrastiveTask",
    "shapes-distill-vlm": "multimodal_models.shapes.distill:ShapesDistillVLMTask",
}


def _import(target: str) -> type:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def model_class(model_type: str) -> type:
    """The class that reads a saved model of this model_type (KeyError for an unknown one)."""
    return _import(MODEL_TYPES[model_type])


def task_class(task: str) -> type:
    """The training task of this name (KeyError for an unknown one)."""
    return _import(TASKS[task])
