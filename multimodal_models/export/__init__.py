"""Models in other formats: `export(model, out, format=...)`, behind `multimodal export`.

    onnx   a dual encoder's image and text towers as ONNX graphs, for ONNX Runtime (export/onnx.py);
           with quantize="int8", quantized by ONNX Runtime
    hf     the Hugging Face layout transformers loads: CLIPModel / SiglipModel for dual encoders,
           ClapModel for audio-text encoders, LlavaForConditionalGeneration or
           Idefics3ForConditionalGeneration for VLMs (the
           writers live with each family's reader in `pretrained`)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import WrongModelError
from ..models.audio_text import AudioTextEncoder
from ..models.dual_encoder import DualEncoder
from ..models.speech import SpeechToText
from ..models.vlm import VisionLanguageModel
from ..pretrained import export_hf, idefics3
from ..pretrained.clap import export_clap
from ..pretrained.llava import export_llava
from ..pretrained.whisper import export_whisper
from .onnx import export_onnx

FORMATS = ("onnx", "hf")


def export(model, out: str | os.PathLike, *, format: str, quantize: str | None = None) -> Path:
    """Write `model` to the folder `out` in `format` ("onnx" or "hf"); returns the folder."""
    if format == "onnx":
        return export_onnx(model, out, quantize=quantize)
    if format != "hf":
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if quantize is not None:
        raise ValueError("--quantize applies to --format onnx; the Hugging Face layout stores float weights "
                         "(quantize when loading: --quantize int8)")
    return _export_hf(model, Path(out))


def _export_hf(model, out: Path) -> Path:
    if isinstance(model, DualEncoder):
        return export_hf(model, out)
    if isinstance(model, AudioTextEncoder):
        return export_clap(model, out)
    if isinstance(model, SpeechToText):
        return export_whisper(model, out)
    if isinstance(model, VisionLanguageModel):
        if model.config.image_prompt == "idefics3":
            if not hasattr(idefics3, "export_idefics3"):
                raise WrongModelError("writing the Idefics3 / SmolVLM layout is not supported yet")
            return idefics3.export_idefics3(model, out)
        return export_llava(model, out)
    raise WrongModelError(f"a {getattr(model, 'model_type', type(model).__name__)} model has no Hugging Face "
                          "layout: --format hf writes dual encoders (CLIP, SigLIP, CLAP) and VLMs (LLaVA, Idefics3)")
