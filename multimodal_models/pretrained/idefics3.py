"""Idefics3 / SmolVLM checkpoints (transformers' Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration, e.g. HuggingFaceTB/SmolVLM-256M-Instruct) as our
VisionLanguageModel, with their image splitting.

The layout in our terms:
- vision: a SigLIP-style transformer without class token or pooling head, post_layernorm on
  every token (final_norm="all"); its features are the last (normed) tokens;
- connector: pixel shuffle by `scale_factor` (the same regrouping as our `pixel_shuffle`:
  each output token holds an s x s block of patches, row-major) then `modality_projection.proj`,
  a linear layer without bias (projector="linear", projector_bias=False);
- language model: Llama (`llama`); the lm_head is tied to the embeddings when the top-level
  tie_word_embeddings says so (the flag transformers reads; text_config's is not), unless a stored
  lm_head differs from the embeddings: then it is used, as transformers does;
- images: `Idefics3ImageProcessor` below, equal to transformers' Idefics3ImageProcessor(Pil) for
  a single image: resize the longest edge to size["longest_edge"] (the other edge rounded up to
  even), then either (do_image_splitting) resize both edges up to multiples of
  max_image_size["longest_edge"] = M, cut M x M tiles row by row and add the whole image resized to
  M x M as a last "global" tile, or resize straight to M x M; rescale and normalise;
- prompt: the checkpoint's chat template; each <image> becomes, for a rows x cols split,
  per tile "<fake_token_around_image><row_r_col_c>" + K x "<image>", a "\n" after each row, then
  "\n<fake_token_around_image><global-img>" + K x "<image>" + "<fake_token_around_image>"
  (unsplit: the global part without the leading "\n"); K = tokens_per_image.

Position embeddings: transformers looks up the position of patch (i, j) through
`bucketize(i / n, boundaries)` in float32, which for some grid sizes n (19, 25, 26, 29, ...)
is not i (two patches share a row of the table). For full-size tiles the lookup is fixed,
so the table is stored here already gathered in that order (`patch_position_ids`).

Key table (HF key -> ours):
    model.vision_model.<SigLIP vision key, no head>         vision.<ours>  (siglip.KEY_MAP)
    model.connector.modality_projection.proj.weight          projector.layers.0.weight
    model.text_model.<Llama key>                             decoder.<ours> (llama.decoder_rows)
    lm_head.weight                                           decoder.lm_head.weight (untied only)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..data.idefics3 import (  # noqa: F401 (idefics3_image_text: used by tests)
    Idefics3ImageProcessor,
    idefics3_image_text,
    image_processor_config,
    load_image_processor,
    missing_image_processor,
)
from ..errors import DataFormatError
from ..models.vlm import VisionLanguageModel, VLMConfig
from . import siglip
from .checkpoint import read_weights
from .llama import decoder_config, decoder_rows, stored_head_tied
from .llava import (attach_checkpoint_preprocessing, check_image_token_id, stop_token_ids, vision_config,
                    vision_rows)
from .weights import assign_weights

ARCHITECTURES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
# Idefics3VisionConfig's defaults (they differ from SigLIP's), for keys a config.json leaves out.
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6}


def patch_position_ids(grid: int) -> torch.Tensor:
    """The position-table row transformers uses for each patch of a full grid x grid image."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    step = 1.0 / torch.tensor([grid])
    fraction = torch.clamp(torch.arange(grid, dtype=torch.float32)[None] * step[:, None], max=1.0 - 1e-6)[0]
    bucket = torch.bucketize(fraction, boundaries, right=True)
    return (bucket[:, None] * grid + bucket[None, :]).reshape(-1)


def config_from_hf(hf: dict, folder: Path) -> VLMConfig:
    source = folder / "config.json"
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {}), "model_type": "siglip_vision_model",
              "vision_use_head": False}
    text = hf.get("text_config") or {"model_type": "llama", "rms_norm_eps": 1e-5}
    tie = bool(hf.get("tie_word_embeddings"))  # transformers 5 reads the top-level flag only (not text_config's)
    return VLMConfig(
        vision=vision_config(vision, source),
        decoder=decoder_config(text, tie_embeddings=tie, source=str(source)),
        pixel_shuffle=int(hf.get("scale_factor", 2)),
        projector="linear",
        projector_bias=False,
        image_token_id=int(hf.get("image_token_id", 128257)),
        vision_layer=None,
        vision_tokens="patches",
        chat_format="jinja",
        image_token="<image>",
        image_prompt="idefics3",
        stop_token_ids=stop_token_ids(folder, hf),
    )


def key_rows(config: VLMConfig) -> list[tuple[str, str, str | None]]:
    rows = vision_rows(siglip, config.vision, "model.")
    rows.append(("model.connector.modality_projection.proj.weight", "projector.layers.0.weight", None))
    return rows + decoder_rows(config.decoder, "model.text_model.", "lm_head.weight")


def load_idefics3(folder: str | os.PathLike, hf_config: dict | None = None) -> VisionLanguageModel:
    """Our VisionLanguageModel from an Idefics3 / SmolVLM folder (eval mode, preprocessing attached)."""
    folder = Path(folder)
    hf = hf_config if hf_config is not None else json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = config_from_hf(hf, folder)
    source = folder / "model.safetensors"
    tensors = read_weights(folder)  # transformers stores these under the names it uses in memory
    tie = stored_head_tied(config.decoder.tie_embeddings, tensors, "model.text_model.embed_tokens.weight",
                           "lm_head.weight", source)
    if not tie and "lm_head.weight" not in tensors and (hf.get("text_config") or {}).get("tie_word_embeddings"):
        raise DataFormatError(folder / "config.json", "there is no lm_head.weight and the top-level "
                              "tie_word_embeddings, the flag transformers reads for this model, is not true (only "
                              "text_config's is); set it to true if the head is the token embeddings",
                              field="tie_word_embeddings")
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, tie_embeddings=tie))
    model = VisionLanguageModel(config)
    order = patch_position_ids(config.vision.grid)
    optional = {"lm_head.weight"} if config.decoder.tie_embeddings else set()
    assign_weights(model, tensors, key_rows(config), source, optional=optional,
                   transforms={"model.vision_model.embeddings.position_embedding.weight": lambda t: t[:, order]})
    image_processor = load_image_processor(folder)  # preprocessor_config.json, or processor_config.json's
    if image_processor is None:
        raise missing_image_processor(folder)
    source = image_processor_config(folder)[1]
    if not isinstance(image_processor, Idefics3ImageProcessor):
        raise DataFormatError(source, "expected an Idefics3ImageProcessor / SmolVLMImageProcessor config",
                              field="image_processor_type")
    if image_processor.tile_size != config.vision.image_size:
        raise DataFormatError(source, f"tiles of {image_processor.tile_size} pixels but the vision tower "
                              f"reads {config.vision.image_size}", field="max_image_size")
    attach_checkpoint_preprocessing(model, folder, image_processor=image_processor)
    processor = folder / "processor_config.json"
    if processor.is_file():
        seq_len = json.loads(processor.read_text(encoding="utf-8")).get("image_seq_len")
        if seq_len is not None and seq_len != config.tokens_per_image:
            raise DataFormatError(processor, f"image_seq_len {seq_len} but the model makes {config.tokens_per_image} "
                                  "image tokens per tile", field="image_seq_len")
    check_image_token_id(model, folder)
    return model.eval()
