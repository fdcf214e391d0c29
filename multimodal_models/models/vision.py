"""Vision Transformer: image -> patch tokens (+ a pooled vector).

A stem turns pixels into a grid of tokens: a patch embedding (one strided convolution,
as in ViT/CLIP/SigLIP) or, for tiny images, a small convolutional stem (3x3 convolutions
and max-pooling) that sees edges and shapes before it cuts patches. Position embeddings are learned;
pre-norm transformer blocks follow; the pooled vector is the class token, the mean of the
patch tokens, or an attention-pooling head (SigLIP's "MAP" head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .layers import MLP, TransformerBlock, init_weights, make_norm


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    mlp_hidden: int | None = None  # MLP width; None: int(width * mlp_ratio) (SigLIP so400m's 4304 is no round ratio)
    stem: str = "patch"  # "patch" (one strided conv) | "conv" (strided 3x3 convs, for tiny images)
    pool: str = "cls"  # "cls" | "mean" | "max" (over patch tokens) | "map" (attention pooling head)
    class_token: bool = True  # prepend a learned class token (CLIP); SigLIP has none
    pre_norm: bool = False  # a LayerNorm before the blocks (CLIP's pre_layrnorm)
    final_norm: str = "all"  # "all": norm every output token (SigLIP) | "pooled": only the pooled vector (CLIP)
    act: str = "gelu"
    norm_eps: float = 1e-5
    patch_bias: bool = True  # CLIP's patch embedding has no bias
    dropout: float = 0.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def validate(self) -> None:
        # A patch stem drops the pixels past the last whole patch, as a strided convolution (and
        # transformers' ViTs: SigLIP at 384 px with 14 px patches has a 27 x 27 grid) does
        if self.stem == "conv" and self.image_size % self.patch_size:
            raise ValueError(f"the conv stem needs image_size ({self.image_size}) to be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch_size, got {self.patch_size}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True")


class VisionOutput(NamedTuple):
    tokens: torch.Tensor  # (B, N, C) patch tokens (class token first when there is one)
    pooled: torch.Tensor  # (B, C)


class PatchEmbedding(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.channels, config.width, config.patch_size, stride=config.patch_size,
                              bias=config.patch_bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, N, C)


class ConvStem(nn.Module):
    """VGG-style: log2(patch) stages of 3x3 conv + ReLU + 2x2 max-pool (widths 32, 64, ...), then a
    1x1 conv to the model width. On tiny images of small objects it learns shapes from far
    fewer examples than one strided patch projection does."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        steps = int(math.log2(config.patch_size))
        layers: list[nn.Module] = []
        channels = config.channels
        for i in range(steps):
            out = min(config.width, 32 * 2**i)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        layers.append(nn.Conv2d(channels, config.width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels).flatten(2).transpose(1, 2)  # (B, N, C)


class AttentionPool(nn.Module):
    """One learned query attends over the tokens (SigLIP's multihead attention pooling head)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, eps: float, act: str):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_hidden, act)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(tokens.shape[0], -1, -1)
        x = self.attention(probe, tokens, tokens, need_weights=False)[0]
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.stem = ConvStem(config) if config.stem == "conv" else PatchEmbedding(config)
        tokens = config.num_patches + int(config.class_token)
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.width)) if config.class_token else None
        self.position = nn.Parameter(torch.zeros(1, tokens, config.width))
        self.pre_norm = nn.LayerNorm(config.width, eps=config.norm_eps) if config.pre_norm else None
        hidden = config.mlp_hidden or int(config.width * config.mlp_ratio)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.width, config.heads, hidden, norm_eps=config.norm_eps, act=config.act,
                             dropout=config.dropout)
            for _ in range(config.depth)
        )
        self.final_norm = make_norm("layernorm", config.width, config.norm_eps)
        self.pool_head = (
            AttentionPool(config.width, config.heads, hidden, config.norm_eps, config.act) if config.pool == "map" else None
        )
        init_weights(self)
        nn.init.normal_(self.position, std=0.02)
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=0.02)

    def forward(self, pixels: torch.Tensor, *, layer: int | None = None) -> VisionOutput:
        """pixels (B, 3, H, W), preprocessed -> tokens (B, N, C), pooled (B, C).

        layer: return the tokens after that block instead (negative counts from the end,
        -1 = last block, before the final norm), as LLaVA reads its vision tower's
        penultimate layer; `pooled` is then computed from the full stack as usual.
        """
        expected = (self.config.channels, self.config.image_size, self.config.image_size)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected pixels of shape (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")
        x = self.stem(pixels.to(self.position.dtype))  # float32 pixels into a bf16/fp16 model too
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        chosen = None
        wanted = None if layer is None else layer % len(self.blocks)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == wanted:
                chosen = x
        if self.config.final_norm == "all":
            x = self.final_norm(x)
        if self.config.pool == "cls":
            pooled = x[:, 0]
        elif self.config.pool == "mean":
            pooled = x[:, int(self.class_token is not None):].mean(dim=1)
        elif self.config.pool == "max":
            pooled = x[:, int(self.class_token is not None):].amax(dim=1)
        else:
            pooled = self.pool_head(x)
        if self.config.final_norm == "pooled":
            pooled = self.final_norm(pooled)
        return VisionOutput(x if chosen is None else chosen, pooled)
