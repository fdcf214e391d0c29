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

Export (`export_idefics3`, behind `multimodal export --format hf`) writes the same layout back
through the same key table, as transformers 5's save_pretrained writes an Idefics3 checkpoint
(model and Idefics3Processor): an Idefics3ForConditionalGeneration config.json (a SmolVLM folder
comes back as Idefics3, the same model and numbers), the position table un-gathered, and
processor_config.json with the image settings nested under "image_processor".

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
from ..models.dual_encoder import DualEncoderConfig
from ..models.vlm import VisionLanguageModel, VLMConfig
from . import siglip
from .checkpoint import read_weights
from .llama import decoder_config, decoder_rows, decoder_to_hf_config, stored_head_tied
from .llava import (attach_checkpoint_preprocessing, check_image_token_id, check_plain_vlm, effective_vision,
                    stop_token_ids, vision_config, vision_rows, write_vlm_folder)
from .weights import assign_weights, export_tensors

MODEL_TYPE = "idefics3"
PROCESSOR_CLASS = "Idefics3Processor"
POSITION_KEY = "model.vision_model.embeddings.position_embedding.weight"
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
                   transforms={POSITION_KEY: lambda t: t[:, order]})
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


# -- export -------------------------------------------------------------------------------------


def config_to_hf(config: VLMConfig) -> dict:
    """An Idefics3ForConditionalGeneration config.json for our config; refuses what Idefics3 cannot
    hold (it is read back with `config_from_hf` and must give our config)."""
    if config.image_prompt != "idefics3":
        raise ValueError("only a model with Idefics3's image prompt (image_prompt='idefics3') is an Idefics3 model")
    vision = config.vision
    siglip_vision = siglip.config_to_hf(DualEncoderConfig(vision=vision, embed_dim=vision.width))["vision_config"]
    hf_vision = {key: value for key, value in siglip_vision.items() if key != "vision_use_head"}
    hf_vision["model_type"] = "idefics3_vision"
    kind = "qwen2" if config.decoder.qkv_bias and not config.decoder.out_bias else "llama"
    hf = {
        "architectures": [ARCHITECTURES[MODEL_TYPE]],
        "model_type": MODEL_TYPE,
        "dtype": "float32",
        "image_token_id": config.image_token_id,
        "scale_factor": config.pixel_shuffle,
        "tie_word_embeddings": config.decoder.tie_embeddings,  # the flag transformers reads (top level)
        "text_config": decoder_to_hf_config(config.decoder, kind),
        "vision_config": hf_vision,
    }
    back = config_from_hf(hf, Path("<export>"))
    back = dataclasses.replace(back, stop_token_ids=config.stop_token_ids, caption_beams=config.caption_beams)
    if back.vision != config.vision and effective_vision(back.vision) == effective_vision(vision):
        back = dataclasses.replace(back, vision=config.vision)
    if back.decoder != config.decoder and _effective_decoder(back.decoder) == _effective_decoder(config.decoder):
        back = dataclasses.replace(back, decoder=config.decoder)
    if back != config:
        differences = {f.name: (getattr(config, f.name), getattr(back, f.name)) for f in dataclasses.fields(config)
                       if getattr(config, f.name) != getattr(back, f.name)}
        raise ValueError("the model cannot be written as Idefics3ForConditionalGeneration; these settings differ "
                         "(ours, what Idefics3 would hold): " + "; ".join(f"{k}: {v[0]!r} vs {v[1]!r}"
                                                                          for k, v in differences.items()))
    return hf


def _effective_decoder(decoder) -> dict:
    data = dataclasses.asdict(decoder)
    data["mlp_hidden"] = data["mlp_hidden"] or 4 * data["width"]
    data["kv_heads"] = data["kv_heads"] or data["heads"]
    data["head_dim"] = data["head_dim"] or data["width"] // data["heads"]
    data.pop("dropout")
    return data


def position_table_to_hf(ours: torch.Tensor, grid: int) -> torch.Tensor:
    """The vision position table as transformers stores it: a T with T[patch_position_ids] == ours.
    `ours` is one: the lookup maps a row it reads to itself, so the table `load_idefics3` gathered
    (ours = T[order]) has ours[order] == ours, and rows transformers never reads keep our values.
    Training can make two patches that read one row of transformers' table differ; no Idefics3
    table gives those numbers, and that is refused."""
    order = patch_position_ids(grid)
    if not torch.equal(ours[order], ours):
        shared = sorted({int(r) for r in order if int((order == r).sum()) > 1})
        raise ValueError(f"the vision position embeddings differ between patches that transformers' Idefics3 "
                         f"looks up in one row of its table (grid {grid}: rows {shared[:6]}); this table cannot "
                         "be written in the Idefics3 layout")
    return ours


def export_idefics3(model: VisionLanguageModel, directory: str | os.PathLike) -> Path:
    """Write `model` as an Idefics3 folder that transformers' Idefics3ForConditionalGeneration and
    AutoProcessor (Idefics3Processor) load: config.json, model.safetensors, generation_config.json,
    tokenizer.json + tokenizer_config.json, chat_template.jinja and processor_config.json (image_seq_len
    and the image processor's settings, splitting included), the inverse of `load_idefics3`."""
    check_plain_vlm(model)
    hf = config_to_hf(model.config)
    if not isinstance(model.image_processor, Idefics3ImageProcessor):
        raise ValueError(f"an Idefics3 model needs an Idefics3ImageProcessor (its image splitting), not "
                         f"{type(model.image_processor).__name__}")
    if model.image_processor.tile_size != model.config.vision.image_size:
        raise ValueError(f"the image processor makes tiles of {model.image_processor.tile_size} pixels but the vision "
                         f"tower reads {model.config.vision.image_size}")
    tensors = export_tensors(model, key_rows(model.config))
    tensors[POSITION_KEY] = position_table_to_hf(tensors[POSITION_KEY], model.config.vision.grid)
    processor = {"image_seq_len": model.config.tokens_per_image, "processor_class": PROCESSOR_CLASS}
    return write_vlm_folder(model, directory, hf, tensors, processor, nest_image_processor=True)
