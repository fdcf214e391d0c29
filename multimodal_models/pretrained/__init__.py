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

from ..data.hf_tokenizer import HFTokenizer
from ..errors import DataFormatError
from ..models.templates import CLIP_IMAGENET_TEMPLATES, CLIP_IMAGENET_TEMPLATES_7
from . import clap, clip, idefics3, llava, siglip, whisper
from .checkpoint import check_expressible, load_dual_encoder, ours_to_hf, write_hf_folder
from .hub import HubDownloadError, resolve_checkpoint

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


def supported_layouts() -> dict[str, str]:
    """Every Hugging Face layout this package reads: config.json "model_type" -> transformers' class."""
    return {clip.MODEL_TYPE: clip.ARCHITECTURE, siglip.MODEL_TYPE: siglip.ARCHITECTURE,
            llava.MODEL_TYPE: llava.ARCHITECTURE, **idefics3.ARCHITECTURES,
            clap.MODEL_TYPE: clap.ARCHITECTURE, whisper.MODEL_TYPE: whisper.ARCHITECTURE}


def unsupported_layout(config_file: Path, config: dict, own_types: list[str] | None = None) -> DataFormatError:
    """The error for a config.json that is none of the layouts this package reads, naming them all."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    what = f"model_type {model_type!r}" + (f" ({', '.join(map(str, architectures))})" if architectures else "")
    layouts = ", ".join(f"{kind} ({name})" for kind, name in supported_layouts().items())
    message = f"{what} is not a layout this package reads. Hugging Face layouts it reads: {layouts}"
    if own_types:
        message += f"; and the model types it saves: {', '.join(own_types)}"
    return DataFormatError(config_file, message, field="model_type")


def load_hf(name_or_path: str | os.PathLike, *, revision: str | None = None):
    """A CLIPModel / SiglipModel checkpoint (local folder or hub id) as our DualEncoder, eval mode,
    with its tokenizer (HFTokenizer, or SigLIP's SentencePiece one) and image processor attached."""
    folder = resolve_checkpoint(name_or_path, revision=revision)
    config_file = folder / "config.json"
    hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    family = hf_family(hf_config)
    if family is None:
        if hf_config.get("model_type") in supported_layouts():  # a vision-language model: not a dual encoder
            raise DataFormatError(config_file, f"is a {hf_config['model_type']} checkpoint, not a CLIPModel or "
                                               "SiglipModel; load it with multimodal_models.load", field="model_type")
        raise unsupported_layout(config_file, hf_config)
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
           "export_hf", "hf_family", "is_hf_checkpoint", "load_hf", "resolve_checkpoint", "supported_layouts",
           "unsupported_layout"]
