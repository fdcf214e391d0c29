"""Common image corruptions at five severities, after ImageNet-C (Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019).

The parameters are those of the authors' 64x64 variant (hendrycks/robustness,
ImageNet-C/create_c/make_imagenet_64_c.py), the one made for images of the Shapes world's size:

| corruption     | severities 1..5                        | what it does                                   |
|----------------|----------------------------------------|------------------------------------------------|
| gaussian_noise | sigma 0.04, 0.08, 0.12, 0.15, 0.18     | x + N(0, sigma^2) per pixel and channel, x in [0, 1] |
| gaussian_blur  | sigma 0.5, 0.75, 1, 1.25, 1.5 px       | Gaussian filter, edges repeated, cut at 4 sigma |
| jpeg           | quality 65, 58, 50, 40, 25             | a JPEG round trip (Pillow)                     |
| brightness     | +0.1, +0.2, +0.3, +0.4, +0.5           | HSV value channel raised, clipped at 1          |
| contrast       | factor 0.4, 0.3, 0.2, 0.1, 0.05        | (x - mean) * factor + mean, per image          |
| pixelate       | side x 0.9, 0.8, 0.7, 0.6, 0.5         | box-filtered down, box-filtered back up         |

Two adaptations, so that a corruption means the same whatever size the image has: the blur's sigma
is in pixels of a 64-pixel side and is scaled by the image's shorter side / 64 (ImageNet-C's 224 px
version likewise blurs with sigma 1..6), and pixelation's factor is a fraction of each side as in the
original. Noise is drawn per pixel at the image's own size.

Everything is NumPy and Pillow. The random draws (the noise) come from a generator seeded by
(seed, corruption, severity, the image's key), so a corrupted image is the same in every run and
on every machine, whatever order the images come in.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..data.splits import image_key

SEVERITIES = (1, 2, 3, 4, 5)
PARAMETERS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.15, 0.18),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),
    "jpeg": (65, 58, 50, 40, 25),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "pixelate": (0.9, 0.8, 0.7, 0.6, 0.5),
}
CORRUPTIONS = tuple(PARAMETERS)
REFERENCE_SIDE = 64  # the image side the blur's sigma is given for


def _rng(seed: int, corruption: str, severity: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{corruption}\0{severity}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _to_image(x: np.ndarray) -> Image.Image:
    """float [0, 1] (H, W, 3) -> uint8 RGB, rounded."""
    return Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), "RGB")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(4.0 * sigma + 0.5))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur_array(x: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian filter over the first two axes of x (edges repeated)."""
    kernel = _gaussian_kernel(sigma)
    r = len(kernel) // 2
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        padded = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(kernel))
    return x


def corrupt(image, corruption: str, severity: int, *, seed: int = 0, key: str = "") -> Image.Image:
    """The image (anything `load_image` takes) under one corruption at severity 1..5, as RGB.

    key names the image in the seed of its random draws (the evaluation passes its path or hash),
    so that two images get different noise and the same image the same noise every time."""
    if corruption not in PARAMETERS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    c = PARAMETERS[corruption][severity - 1]
    rgb = load_image(image)
    x = np.asarray(rgb, dtype=np.float64) / 255.0
    if corruption == "gaussian_noise":
        noise = _rng(seed, corruption, severity, key).normal(0.0, c, size=x.shape)
        return _to_image(np.clip(x + noise, 0, 1))
    if corruption == "gaussian_blur":
        sigma = c * min(rgb.size) / REFERENCE_SIDE
        return _to_image(np.clip(gaussian_blur_array(x, sigma), 0, 1))
    if corruption == "jpeg":
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=int(c))
        return load_image(buffer.getvalue())
    if corruption == "brightness":
        # HSV's value V = max(r, g, b) raised by c; hue and saturation kept, so the colour scales by V'/V
        # (a black pixel, whose saturation is 0, turns grey V')
        value = x.max(axis=2, keepdims=True)
        raised = np.minimum(value + c, 1.0)
        scaled = np.where(value > 0, x * raised / np.where(value > 0, value, 1.0), raised)
        return _to_image(np.clip(scaled, 0, 1))
    if corruption == "contrast":
        means = x.mean(axis=(0, 1), keepdims=True)
        return _to_image(np.clip((x - means) * c + means, 0, 1))
    # pixelate
    width, height = rgb.size
    small = rgb.resize((max(1, int(width * c)), max(1, int(height * c))), Image.Resampling.BOX)
    return small.resize((width, height), Image.Resampling.BOX)


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity, seeded: what an evaluation under it applies to every image."""

    name: str
    severity: int
    seed: int = 0

    def __post_init__(self):
        if self.name not in PARAMETERS:
            raise ValueError(f"unknown corruption {self.name!r}; known: {', '.join(CORRUPTIONS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def __call__(self, image, key: str = "") -> Image.Image:
        return corrupt(image, self.name, self.severity, seed=self.seed, key=key)

    def encoded(self, image, key: str = "") -> bytes:
        """The corrupted image as PNG bytes (lossless), for code that takes image sources."""
        buffer = io.BytesIO()
        self(image, key).save(buffer, "PNG")
        return buffer.getvalue()


class CorruptingProcessor:
    """A model's ImageProcessor that corrupts each image before its own preprocessing (resize, crop,
    normalise): an ImageStore built with it holds the corrupted pixels the model would compute."""

    def __init__(self, processor, corruption: Corruption):
        self.processor = processor
        self.corruption = corruption

    def resize_to_array(self, image) -> np.ndarray:
        key = image_key(image) if isinstance(image, bytes | str) or hasattr(image, "__fspath__") else ""
        return self.processor.resize_to_array(self.corruption(image, key))

    def __getattr__(self, name):
        return getattr(self.processor, name)


def parse_corruptions(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of corruption names ("all", or None, for every one) -> the names, checked."""
    if text is None or text.strip() in ("", "all"):
        return CORRUPTIONS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PARAMETERS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS)}")
    return names
