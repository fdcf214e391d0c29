"""Hugging Face checkpoints in our modules: CLIP and SigLIP dual encoders, from a local folder or a hub id.

    from multimodal_models.pretrained import load_hf, export_hf
    model = load_hf("openai/clip-vit-base-patch32")   # or a folder with config.json + model.safetensors
    model.classify("cat.jpg", ["cat", "dog"])          # the CLIP paper's 80 prompt templates
    export_hf(model, "out/")                            # back to the layout transformers reads

`multimodal_models.load(...)` calls `load_hf` for such folders and ids. Each family keeps its one
key table (Hugging Face key -> our key) in its own module: clip.KEY_MAP, siglip.KEY_MAP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataFormatError
from . import clip, siglip
from .checkpoint import check_expressible, load_dual_encoder, ours_to_hf, write_hf_folder
from .hub import HubDownloadError, resolve_checkpoint
from ..models.templates import CLIP_IMAGENET_TEMPLATES, CLIP_IMAGENET_TEMPLATES_7
from ..data.hf_tokenizer import HFTokenizer

FAMILIES = {clip.MODEL_TYPE: clip, siglip.MODEL_TYPE: siglip}  # config.json "model_type" -> module
_BY_ARCHITECTURE = {module.ARCHITECTURE: module for module in FAMILIES.values()}


def hf_family(config: dict):
    """The family module of a Hugging Face config.json dict, or None when it is not one we import."""
    if config.get("model_type") in FAMILIES:
        return FAMILIES[config["model_type"]]
    for name in config.get("architectures") or ():
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    return None


def is_hf_checkpoint(config: dict) -> bool:
    return hf_family(config) is not None


def load_hf(name_or_path: str | os.PathLike, *, revision: str | None = None):
    """A CLIPModel / SiglipModel checkpoint (local folder or hub id) as our DualEncoder, eval mode,
    with its tokenizer (HFTokenizer) and image processor attached."""
    folder = resolve_checkpoint(name_or_path, revision=revision)
    config_file = folder / "config.json"
    hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    family = hf_family(hf_config)
    if family is None:
        known = sorted(m.ARCHITECTURE for m in FAMILIES.values())
        raise DataFormatError(config_file, f"model_type {hf_config.get('model_type')!r} / architectures "
                                           f"{hf_config.get('architectures')} is not a layout this package imports "
                                           f"(it reads {known})", field="model_type")
    return load_dual_encoder(folder, hf_config, family=family.ARCHITECTURE, table=family.KEY_MAP,
                             config_from_hf=family.config_from_hf)


def export_hf(model, directory: str | os.PathLike) -> Path:
    """Write our DualEncoder in the Hugging Face layout: CLIPModel for the "clip" loss, SiglipModel for
    "siglip", so `transformers.<Model>.from_pretrained(directory)` gives the same outputs.
    A model whose config the layout cannot hold (a conv stem, mean pooling, ...) is refused, naming why."""
    family = clip if model.config.loss == "clip" else siglip
    hf_config = family.config_to_hf(model.config, model.tokenizer)
    check_expressible(model.config, family.config_from_hf(hf_config, Path(directory) / "config.json"),
                      family.ARCHITECTURE)
    tensors = family.export_tensors(model, ours_to_hf(model, family.KEY_MAP))
    return write_hf_folder(model, Path(directory), hf_config, tensors)


__all__ = ["CLIP_IMAGENET_TEMPLATES", "CLIP_IMAGENET_TEMPLATES_7", "FAMILIES", "HFTokenizer", "HubDownloadError",
           "export_hf", "hf_family", "is_hf_checkpoint", "load_hf", "resolve_checkpoint"]
