"""`multimodal_models.load(name_or_path)`: a shipped model by name, or a saved model folder.

The one table of names in the package lives here: the model types this package saves
(config.json's "model_type") and the shipped checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataFormatError

SHIPPED_DIR = Path(__file__).parent / "checkpoints"
SHIPPED = {
    "shapes-clip": "dual encoder (CLIP-style) trained on the Shapes benchmark: retrieval, zero-shot classification",
    "shapes-vlm": "native multimodal LM trained on the Shapes benchmark: captions, answers, chat",
}
DEFAULT_VLM = "shapes-vlm"
DEFAULT_DUAL_ENCODER = "shapes-clip"


def model_classes() -> dict[str, type]:
    from .models.classifier import FusionClassifier
    from .models.dual_encoder import DualEncoder
    from .models.vlm import VisionLanguageModel

    return {cls.model_type: cls for cls in (VisionLanguageModel, DualEncoder, FusionClassifier)}


def resolve(name_or_path: str | Path) -> Path:
    """The folder of a shipped model name or a local path."""
    text = str(name_or_path)
    if text in SHIPPED:
        folder = SHIPPED_DIR / text
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"the shipped model '{text}' is missing from {folder}; reinstall the package or retrain it with "
                f"'multimodal train configs/{text}.yaml'"
            )
        return folder
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"'{text}' is neither a shipped model ({', '.join(SHIPPED)}) nor a folder with a saved model"
    )


def load(name_or_path: str | Path, *, device: str = "cpu"):
    """Load a model, its tokenizer and its image preprocessing, ready to use (eval mode)."""
    folder = resolve(name_or_path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {folder} is not a saved model folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    classes = model_classes()
    if model_type not in classes:
        raise DataFormatError(config_file, f"unknown model_type {model_type!r}; this package reads {sorted(classes)}",
                              field="model_type")
    return classes[model_type].from_pretrained(folder).to(device).eval()
