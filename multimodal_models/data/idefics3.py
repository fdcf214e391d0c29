"""Idefics3 / SmolVLM image splitting and its prompt text: how such a checkpoint turns one image into
tiles and the tiles into prompt tokens (multimodal_models.pretrained.idefics3 loads the model).

`Idefics3ImageProcessor` equals transformers' Idefics3ImageProcessor(Pil) for a single image: resize the
longest edge to size["longest_edge"] (the other edge rounded up to even), then either
(do_image_splitting) resize both edges up to multiples of max_image_size["longest_edge"] = M, cut M x M
tiles row by row and add the whole image resized to M x M as a last "global" tile, or resize straight to
M x M; rescale and normalise. `idefics3_image_text` is the prompt of such a split: per tile
"<fake_token_around_image><row_r_col_c>" + K x "<image>", a "\n" after each row, then
"\n<fake_token_around_image><global-img>" + K x "<image>" + "<fake_token_around_image>".
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

from ..errors import DataFormatError
from .hf_tokenizer import read_json_object
from .images import load_image, to_rgb
from .preprocess import RESAMPLE_NAMES, ImageProcessor

PREPROCESSOR_FILE = "preprocessor_config.json"  # the image processor's settings (transformers 4.x, ours)
PROCESSOR_FILE = "processor_config.json"  # the processor's; transformers 5 nests the image settings here
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
MAX_IMAGE_SIZE = 4096  # transformers' cap on either edge after the first resize


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
        path = Path(directory) / PREPROCESSOR_FILE
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


def image_processor_config(directory: str | os.PathLike) -> tuple[dict, str] | None:
    """A checkpoint's image-processor settings and where they are (for errors): preprocessor_config.json
    (transformers 4.x, and the folders saved here), else the "image_processor" object of
    processor_config.json (transformers 5 writes them only there); None when neither holds them."""
    directory = Path(directory)
    config = read_json_object(directory / PREPROCESSOR_FILE)
    if config is not None:
        return config, str(directory / PREPROCESSOR_FILE)
    nested = (read_json_object(directory / PROCESSOR_FILE) or {}).get("image_processor")
    if nested is None:
        return None
    if not isinstance(nested, dict):
        raise DataFormatError(directory / PROCESSOR_FILE, f"expected an object, got {type(nested).__name__}",
                              field="image_processor")
    return nested, f"{directory / PROCESSOR_FILE} (its image_processor object)"


def load_image_processor(directory: str | os.PathLike) -> Idefics3ImageProcessor | ImageProcessor | None:
    """The image processor of a folder in either layout (`image_processor_config`): Idefics3's for
    Idefics3/SmolVLM settings, else ours (CLIP/SigLIP); None when the folder has no image settings."""
    found = image_processor_config(directory)
    if found is None:
        return None
    config, source = found
    if str(config.get("image_processor_type", "")).startswith(("Idefics3", "SmolVLM")):
        return Idefics3ImageProcessor.from_dict(config, source=source)
    try:
        return ImageProcessor.from_dict(config)
    except DataFormatError as exc:  # from_dict names no file: name ours
        detail = str(exc).split(": ", 1)[-1]
        raise DataFormatError(source, detail, field=exc.field) from None


def missing_image_processor(directory: str | os.PathLike) -> FileNotFoundError:
    directory = Path(directory)
    return FileNotFoundError(f"{directory / PREPROCESSOR_FILE} not found (nor an \"image_processor\" object in "
                             f"{PROCESSOR_FILE}, where transformers 5 writes it): the image preprocessing is unknown")


# -- configs and weights ------------------------------------------------------------------------
