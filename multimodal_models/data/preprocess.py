"""Image preprocessing shared by training and inference (Pillow + NumPy + torch, no torchvision).

`ImageProcessor` holds the same fields as a Hugging Face `preprocessor_config.json` for
CLIP/SigLIP-style processors and produces the same pixels as transformers'
CLIPImageProcessor / SiglipImageProcessor (their Pillow/NumPy implementation) for the
same settings:

1. convert to RGB (transparency composited on white);
2. resize with Pillow, either the shortest edge to `size["shortest_edge"]` (the other edge
   `int(shortest * long / short)`, i.e. truncated) or to exactly `size["height"] x size["width"]`;
3. center crop to `crop_size` (offsets `(H - h) // 2`, `(W - w) // 2`; an image smaller
   than the crop is zero-padded, placed `ceil` of half the missing rows/columns from the top/left);
4. rescale: uint8 * `rescale_factor` computed in float64, then cast to float32;
5. normalize: `(x - mean) / std` in float32.

Where we differ on purpose: 16-bit and float images are scaled to 8 bits rather than
clipped (see `multimodal_models.data.images.to_rgb`); transformers clips them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from multimodal_models.data.images import load_image, to_rgb
from multimodal_models.errors import DataFormatError

CONFIG_NAME = "preprocessor_config.json"

# Pillow's resampling filters by their integer codes (what preprocessor_config.json stores).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Keys of preprocessor_config.json that describe the file, not the pixels.
_METADATA_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class", "auto_map", "_processor_class"}

# Keys that are harmless when they hold these values (transformers writes some of them).
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "do_pad": (None, False),
    "pad_size": (None,),
    "use_square_size": (None, False),
    "default_to_square": (None, False, True),  # only affects int `size`, which we read as transformers does
    "data_format": (None, "channels_first"),
    "input_data_format": (None,),
    "return_tensors": (None,),
    "device": (None,),
    "disable_grouping": (None, False, True),
}

ImageLike = Image.Image | np.ndarray | str | os.PathLike | bytes


def _square(side: int) -> dict[str, int]:
    return {"height": side, "width": side}


@dataclass(frozen=True)
class ImageProcessor:
    """Resize / crop / rescale / normalize images into a (B, 3, H, W) float32 tensor.

    Field names and meanings are those of Hugging Face's preprocessor_config.json. The
    defaults are the Shapes models': 64x64, no crop, mean = std = 0.5 (pixels in [-1, 1]).
    """

    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: _square(64))  # {"shortest_edge": n} or {"height", "width"}
    resample: int = 3  # Pillow filter code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None  # {"height", "width"}; required when do_center_crop
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True
    image_processor_type: str = (
        "CLIPImageProcessor"  # written to preprocessor_config.json for transformers' Auto classes
    )

    def __post_init__(self) -> None:
        _set(self, "size", _parse_size(self.size, "size", allow_shortest_edge=True))
        if self.crop_size is not None:
            _set(self, "crop_size", _parse_size(self.crop_size, "crop_size", allow_shortest_edge=False))
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("do_center_crop=True needs crop_size, e.g. {'height': 224, 'width': 224}")
        if isinstance(self.resample, bool) or self.resample not in RESAMPLE_NAMES:
            raise ValueError(f"resample must be a Pillow filter code {sorted(RESAMPLE_NAMES)}, got {self.resample!r}")
        _set(self, "resample", int(self.resample))
        _set(self, "rescale_factor", float(self.rescale_factor))
        _set(self, "image_mean", _parse_channels(self.image_mean, "image_mean"))
        _set(self, "image_std", _parse_channels(self.image_std, "image_std"))
        if any(value == 0 for value in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {list(self.image_std)}")

    # --- the output size ------------------------------------------------------------------

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the tensor produced from a `width` x `height` image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize:
            return self._resized_size(width, height)
        return height, width

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the resize step."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        shortest = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        # Same expression and rounding (truncation) as transformers / torchvision.
        new_long = int(shortest * long / short)
        return (new_long, shortest) if width <= height else (shortest, new_long)

    # --- processing -----------------------------------------------------------------------

    def preprocess_one(self, image: ImageLike) -> np.ndarray:
        """Turn one image into a float32 array of shape (3, H, W).

        `image` may be a PIL image, a uint8 (H, W, 3) array, or anything `load_image`
        accepts (a path or the encoded bytes).
        """
        chw = self.resize_to_array(image).transpose(2, 0, 1)  # (3, H, W)
        if self.do_rescale:
            values = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = chw.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            values = (values - mean) / std
        return np.ascontiguousarray(values, dtype=np.float32)

    def resize_to_array(self, image: ImageLike) -> np.ndarray:
        """The geometric half of preprocessing: RGB, resize, crop -> uint8 (H, W, 3).

        Training caches these small arrays and finishes with `normalize_batch`, which gives
        exactly the numbers `preprocess_one` gives.
        """
        rgb = self._as_rgb(image)
        if self.do_resize:
            height, width = self._resized_size(rgb.width, rgb.height)
            rgb = rgb.resize((width, height), resample=self.resample)
        pixels = np.asarray(rgb)  # (H, W, 3) uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return np.ascontiguousarray(pixels)

    def normalize_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) from `resize_to_array` -> float32 (B, 3, H, W), as `preprocess_one` computes it."""
        values = pixels.permute(0, 3, 1, 2)
        if self.do_rescale:
            values = (values.to(torch.float64) * self.rescale_factor).to(torch.float32)
        else:
            values = values.to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32, device=values.device)[:, None, None]
            std = torch.tensor(self.image_std, dtype=torch.float32, device=values.device)[:, None, None]
            values = (values - mean) / std
        return values.contiguous()

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Preprocess one image -> (1, 3, H, W), or a list of images -> (B, 3, H, W) float32."""
        batch = [images] if _is_single_image(images) else list(images)
        if not batch:
            raise ValueError("no images to preprocess (got an empty list)")
        arrays = [self.preprocess_one(image) for image in batch]
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"the images have different sizes after preprocessing ({sorted(shapes)}); "
                "use a fixed size {'height', 'width'} or do_center_crop to batch them"
            )
        return torch.from_numpy(np.stack(arrays))

    def _as_rgb(self, image: ImageLike) -> Image.Image:
        """Get an RGB PIL image from any accepted input."""
        if isinstance(image, np.ndarray):
            image = _array_to_image(image)
        elif not isinstance(image, Image.Image):
            return load_image(image)  # decoding a file: EXIF orientation and RGB conversion included
        if self.do_convert_rgb:
            return to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"do_convert_rgb=False but the image is in mode {image.mode!r}; expected an RGB image")
        return image

    # --- (de)serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json content (JSON-ready)."""
        data = asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        if data["crop_size"] is None:
            del data["crop_size"]
        return data

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ImageProcessor":
        """Build from a preprocessor_config.json dict (transformers' layout, old or new).

        Accepts the legacy forms `size: 224` (shortest edge, as CLIP's processor reads it),
        `crop_size: 224` (square) and `size: [h, w]`. Keys that would change the pixels in
        a way this class does not implement raise ValueError instead of being ignored.
        """
        return _from_config(cls, config, source="<dict>")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/preprocessor_config.json` and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageProcessor":
        """Read `directory/preprocessor_config.json` (a local folder in the Hugging Face layout)."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} in {directory}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        if not isinstance(config, dict):
            raise DataFormatError(path, f"expected a JSON object, got {type(config).__name__}")
        return _from_config(cls, config, source=str(path))


# --- helpers ---------------------------------------------------------------------------------


def _set(instance: object, name: str, value: object) -> None:
    """Assign a normalised value to a field of a frozen dataclass during __post_init__."""
    object.__setattr__(instance, name, value)


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _parse_size(value: object, name: str, *, allow_shortest_edge: bool) -> dict[str, int]:
    """Normalise a size to {"shortest_edge": n} or {"height": h, "width": w}."""
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"height", "width"}:
            return {
                "height": _positive_int(value["height"], f"{name}['height']"),
                "width": _positive_int(value["width"], f"{name}['width']"),
            }
        if allow_shortest_edge and keys == {"shortest_edge"}:
            return {"shortest_edge": _positive_int(value["shortest_edge"], f"{name}['shortest_edge']")}
    allowed = (
        "{'shortest_edge': n} or {'height': h, 'width': w}" if allow_shortest_edge else "{'height': h, 'width': w}"
    )
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _parse_channels(value: object, name: str) -> tuple[float, float, float]:
    """Normalise a per-channel value (one number, or three) to a tuple of 3 floats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        values = tuple(value)
        if len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return tuple(float(v) for v in values)  # type: ignore[return-value]
    raise ValueError(f"{name} must be a number or 3 numbers (R, G, B), got {value!r}")


def _legacy_size(value: object, *, square: bool) -> object:
    """Read the older int/list forms of `size` and `crop_size` the way transformers does."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _square(value) if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    return value


def _from_config(cls: type[ImageProcessor], config: Mapping[str, Any], *, source: str) -> ImageProcessor:
    """Validate a preprocessor config and build the processor; errors name `source` and the key."""
    field_names = {f.name for f in fields(cls)}
    for key, value in config.items():
        if key in field_names or key in _METADATA_KEYS:
            continue
        if key in _NEUTRAL_VALUES and value in _NEUTRAL_VALUES[key]:
            continue
        raise DataFormatError(
            source,
            f"unsupported setting {key}={value!r}: this processor implements only CLIP/SigLIP-style "
            "resize, center crop, rescale and normalize",
            field=key,
        )
    kwargs = {key: value for key, value in config.items() if key in field_names}
    if "size" in kwargs:
        kwargs["size"] = _legacy_size(kwargs["size"], square=config.get("default_to_square") is True)
    if "crop_size" in kwargs:
        kwargs["crop_size"] = _legacy_size(kwargs["crop_size"], square=True)
    if "image_processor_type" not in config and "feature_extractor_type" in config:
        kwargs["image_processor_type"] = str(config["feature_extractor_type"]).replace(
            "FeatureExtractor", "ImageProcessor"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(source, str(exc)) from None


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center-crop a (H, W, C) array; axes shorter than the crop are zero-padded first."""
    height, width = pixels.shape[:2]
    top, pad_top = _crop_offsets(height, crop_height)
    left, pad_left = _crop_offsets(width, crop_width)
    if height >= crop_height and width >= crop_width:
        return pixels[top : top + crop_height, left : left + crop_width]
    canvas = np.zeros((max(height, crop_height), max(width, crop_width), pixels.shape[2]), dtype=pixels.dtype)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    return canvas[top : top + crop_height, left : left + crop_width]


def _crop_offsets(size: int, crop: int) -> tuple[int, int]:
    """(start of the crop in the padded axis, padding before the image) along one axis."""
    if size >= crop:
        return (size - crop) // 2, 0
    pad_before = -((size - crop) // 2)  # ceil((crop - size) / 2)
    return 0, pad_before


def _array_to_image(array: np.ndarray) -> Image.Image:
    """Accept a uint8 (H, W, 3) or (H, W) array as an image."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"an image array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {array.dtype} {array.shape}"
        )
    return Image.fromarray(array)


def _is_single_image(images: object) -> bool:
    """True when `images` is one image rather than a sequence of them."""
    return isinstance(images, (Image.Image, np.ndarray, str, bytes, bytearray, os.PathLike))
