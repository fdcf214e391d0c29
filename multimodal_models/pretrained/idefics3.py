"""Idefics3 / SmolVLM checkpoints (transformers' Idefics3ForConditionalGeneration and
SmolVLMForConditionalGeneration, e.g. HuggingFaceTB/SmolVLM-256M-Instruct) as our
VisionLanguageModel, with their image splitting.

The layout in our terms:
- vision: a SigLIP-style transformer without class token or pooling head, post_layernorm on
  every token (final_norm="all"); its features are the last (normed) tokens;
- connector: pixel shuffle by `scale_factor` (the same regrouping as our `pixel_shuffle`:
  each output token holds an s x s block of patches, row-major) then `modality_projection.proj`,
  a linear layer without bias (projector="linear", projector_bias=False);
- language model: Llama (`llama`);
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
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.images import load_image, to_rgb
from ..data.preprocess import RESAMPLE_NAMES, ImageProcessor
from ..errors import DataFormatError
from ..models.vlm import VisionLanguageModel, VLMConfig
from . import siglip
from .checkpoint import read_weights
from .llama import decoder_config, decoder_rows
from .llava import (attach_checkpoint_preprocessing, check_image_token_id, stop_token_ids, vision_config,
                    vision_rows)
from .weights import assign_weights

ARCHITECTURES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
MAX_IMAGE_SIZE = 4096  # transformers' cap on either edge after the first resize
# Idefics3VisionConfig's defaults (they differ from SigLIP's), for keys a config.json leaves out.
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6}


# -- the prompt ---------------------------------------------------------------------------------


def idefics3_image_text(rows: int, cols: int, tokens: int, *, image_token: str = "<image>") -> str:
    """The prompt text of one image split into rows x cols tiles (0, 0: not split) plus its global view."""
    tile = image_token * tokens
    text = ""
    if rows or cols:
        for r in range(rows):
            text += "".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(cols)) + "\n"
        text += "\n"
    return text + f"{FAKE_TOKEN}{GLOBAL_TOKEN}{tile}{FAKE_TOKEN}"


# -- image processing -------------------------------------------------------------------------


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest edge at `longest`, the other scaled and rounded up to even,
    then both capped at MAX_IMAGE_SIZE keeping the ratio (transformers' two-step rule)."""
    ratio = width / height
    if width >= height:
        width = longest
        height = int(width / ratio)
        height += height % 2
    else:
        height = longest
        width = int(height * ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * ratio)
    return max(height, 1), max(width, 1)


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of `tile`, the shorter edge following the ratio first."""
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * ratio) / tile) * tile
    return height, width


def _longest(value: Any, name: str) -> int:
    if isinstance(value, dict) and set(value) == {"longest_edge"} and isinstance(value["longest_edge"], int):
        return value["longest_edge"]
    raise ValueError(f"{name} must be {{'longest_edge': n}}, got {value!r}")


@dataclass(frozen=True)
class Idefics3ImageProcessor:
    """Idefics3 / SmolVLM image preprocessing (fields as in their preprocessor_config.json).

    `__call__(images)` gives the tiles of every image in order, (N_tiles, 3, M, M) float32:
    for each image its rows x cols tiles row by row, then its global view (or just the one
    M x M view when not splitting). `grid(image)` says rows, cols for the prompt.
    """

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 4 * 364})
    resample: int = 1  # Pillow filter code (1: LANCZOS)
    do_image_splitting: bool = True
    max_image_size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 364})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_pad: bool = True  # pads a batch's image lists to one length: nothing to do for our flat list of tiles
    image_processor_type: str = "Idefics3ImageProcessor"

    def __post_init__(self) -> None:
        _longest(self.size, "size")
        _longest(self.max_image_size, "max_image_size")
        if isinstance(self.resample, bool) or self.resample not in RESAMPLE_NAMES:
            raise ValueError(f"resample must be a Pillow filter code {sorted(RESAMPLE_NAMES)}, got {self.resample!r}")
        # rescale and normalise exactly as our CLIP/SigLIP processor does (the same transformers code)
        finish = ImageProcessor(do_resize=False, do_rescale=self.do_rescale, rescale_factor=self.rescale_factor,
                                do_normalize=self.do_normalize, image_mean=self.image_mean, image_std=self.image_std,
                                do_convert_rgb=self.do_convert_rgb)
        object.__setattr__(self, "image_mean", finish.image_mean)
        object.__setattr__(self, "image_std", finish.image_std)
        object.__setattr__(self, "_finish", finish)

    @property
    def tile_size(self) -> int:
        return self.max_image_size["longest_edge"]

    # -- geometry ---------------------------------------------------------------------------

    def _sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(height, width) after the first resize, and after the resize to tile multiples (or None)."""
        first = _longest_edge_size(height, width, self.size["longest_edge"]) if self.do_resize else (height, width)
        second = _tile_multiple_size(*first, self.tile_size) if self.do_image_splitting else None
        return first, second

    def grid(self, image: Any) -> tuple[int, int]:
        """(rows, cols) of tiles the image is split into; (0, 0) when it is not split."""
        if not self.do_image_splitting:
            return 0, 0
        rgb = self._as_rgb(image)
        _, (height, width) = self._sizes(rgb.width, rgb.height)
        if height > self.tile_size or width > self.tile_size:
            return height // self.tile_size, width // self.tile_size
        return 0, 0

    def tiles(self, image: Any) -> tuple[list[np.ndarray], int, int]:
        """The uint8 (M, M, 3) tiles of one image in prompt order, and rows, cols."""
        rgb = self._as_rgb(image)
        M = self.tile_size
        resample = self.resample
        first, second = self._sizes(rgb.width, rgb.height)
        if self.do_resize:
            rgb = rgb.resize((first[1], first[0]), resample=resample)
        if not self.do_image_splitting:
            return [np.asarray(rgb.resize((M, M), resample=resample))], 0, 0
        rgb = rgb.resize((second[1], second[0]), resample=resample)
        height, width = second
        if height <= M and width <= M:
            return [np.asarray(rgb)], 0, 0
        rows, cols = height // M, width // M
        pixels = np.asarray(rgb)
        tiles = [pixels[r * M:(r + 1) * M, c * M:(c + 1) * M] for r in range(rows) for c in range(cols)]
        tiles.append(np.asarray(rgb.resize((M, M), resample=resample)))  # the global view
        return tiles, rows, cols

    # -- processing -------------------------------------------------------------------------

    def __call__(self, images: Any | Sequence[Any]) -> torch.Tensor:
        """One image or a list -> all their tiles, (N_tiles, 3, M, M) float32."""
        batch = [images] if _is_single_image(images) else list(images)
        if not batch:
            raise ValueError("no images to preprocess (got an empty list)")
        tiles = [tile for image in batch for tile in self.tiles(image)[0]]
        stacked = torch.from_numpy(np.ascontiguousarray(np.stack(tiles)))  # (N, M, M, 3) uint8
        return self._finish.normalize_batch(stacked)

    def _as_rgb(self, image: Any) -> Image.Image:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            return load_image(image)
        if self.do_convert_rgb:
            return to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"do_convert_rgb=False but the image is in mode {image.mode!r}; expected an RGB image")
        return image

    # -- files --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["image_mean"], data["image_std"] = list(self.image_mean), list(self.image_std)
        return data

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "preprocessor_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, config: dict, *, source: str = "<dict>") -> Idefics3ImageProcessor:
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = {"processor_class", "_processor_class", "feature_extractor_type", "auto_map",
                   "video_sampling", "return_row_col_info", "data_format", "input_data_format", "return_tensors",
                   "device", "disable_grouping"}
        unknown = sorted(set(config) - names - ignored)
        if unknown:
            raise DataFormatError(source, f"unsupported settings {unknown}: this processor implements Idefics3's "
                                          f"resize, splitting, rescale and normalize")
        try:
            return cls(**{k: v for k, v in config.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise DataFormatError(source, str(exc)) from None


def _is_single_image(images: Any) -> bool:
    return isinstance(images, (Image.Image, np.ndarray, str, bytes, bytearray, os.PathLike))


def load_image_processor(directory: Path):
    """The image processor of a folder: Idefics3's for Idefics3/SmolVLM configs, else ours (CLIP/SigLIP)."""
    path = Path(directory) / "preprocessor_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if str(config.get("image_processor_type", "")).startswith(("Idefics3", "SmolVLM")):
        return Idefics3ImageProcessor.from_dict(config, source=str(path))
    return ImageProcessor.from_pretrained(directory)


# -- configs and weights ------------------------------------------------------------------------


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
    tie = bool(hf.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
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
    model = VisionLanguageModel(config)
    source = folder / "model.safetensors"
    tensors = read_weights(folder)  # transformers stores these under the names it uses in memory
    order = patch_position_ids(config.vision.grid)
    optional = {"lm_head.weight"} if config.decoder.tie_embeddings else set()
    assign_weights(model, tensors, key_rows(config), source, optional=optional,
                   transforms={"model.vision_model.embeddings.position_embedding.weight": lambda t: t[:, order]})
    processor_file = folder / "preprocessor_config.json"
    if not processor_file.is_file():
        raise FileNotFoundError(f"{processor_file} not found: the image preprocessing is unknown")
    image_processor = load_image_processor(folder)
    if not isinstance(image_processor, Idefics3ImageProcessor):
        raise DataFormatError(processor_file, "expected an Idefics3ImageProcessor / SmolVLMImageProcessor config",
                              field="image_processor_type")
    if image_processor.tile_size != config.vision.image_size:
        raise DataFormatError(processor_file, f"tiles of {image_processor.tile_size} pixels but the vision tower "
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
