"""A small convolutional image encoder: the first generation's encoder, beside the ViT.

Stages of 3x3 convolution, batch norm and ReLU, each with its stride (2 halves the grid), as
the baseline CNN of the Relation Network paper and FiLM's stem. A first stage at full
resolution sees the edges of small objects before anything is thrown away. The last feature map is
the image's tokens, one per cell of its grid, row by row, the same (B, N, C) a ViT returns;
the pooled vector is their mean. Batch norm is what lets a CNN trained from scratch on a
few thousand images learn fast at a high learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import init_weights
from .vision import VisionOutput

CNN_NORMS = ("batch", "none")


@dataclass
class CNNConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 64, 128, 128)  # one stage per entry: its output channels
    strides: tuple[int, ...] = (1, 2, 2, 2, 1)  # each stage's stride (1 or 2): a grid of image_size / product
    norm: str = "batch"  # "batch" | "none"

    @property
    def width(self) -> int:
        return self.channels[-1]

    @property
    def reduction(self) -> int:
        return math.prod(self.strides)

    @property
    def grid(self) -> int:
        return self.image_size // self.reduction

    def validate(self) -> None:
        if not self.channels:
            raise ValueError("cnn.channels is empty; give one output width per stage, e.g. [32, 64, 128]")
        if len(self.strides) != len(self.channels) or any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"cnn.strides {list(self.strides)} must give 1 or 2 for each of the "
                             f"{len(self.channels)} stages of cnn.channels")
        if self.image_size % self.reduction:
            raise ValueError(f"cnn.image_size {self.image_size} is not a multiple of the strides' product {self.reduction}")
        if self.norm not in CNN_NORMS:
            raise ValueError(f"unknown cnn.norm {self.norm!r}; expected one of {CNN_NORMS}")


class ConvEncoder(nn.Module):
    def __init__(self, config: CNNConfig, in_channels: int = 3):
        super().__init__()
        config.validate()
        self.config = config
        layers: list[nn.Module] = []
        channels = in_channels
        for out, stride in zip(config.channels, config.strides):
            layers.append(nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=config.norm == "none"))
            if config.norm == "batch":
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.layers = nn.Sequential(*layers)
        init_weights(self)  # He initialisation for the convolutions

    def forward(self, pixels: torch.Tensor) -> VisionOutput:
        """pixels (B, 3, H, W), preprocessed -> tokens (B, grid * grid, C), pooled (B, C)."""
        size = self.config.image_size
        if tuple(pixels.shape[2:]) != (size, size):
            raise ValueError(f"expected pixels of shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        dtype = self.layers[0].weight.dtype
        x = self.layers(pixels.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        return VisionOutput(x, x.mean(dim=1))
