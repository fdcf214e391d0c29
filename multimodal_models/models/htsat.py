"""HTSAT: the audio tower of CLAP, a Swin Transformer over a log-mel spectrogram.

The input is (B, C, T, F) log-mel frames (C = 1, or 4 for "fusion": the whole clip shrunk to one
chunk, then three crops of it; see `audio_text.AudioFeatureExtractor`). Step by step, as LAION's
HTSAT and transformers' ClapAudioEncoder compute it:

1. a BatchNorm over the mel bins;
2. the time axis is stretched (bicubic) to `spec_size * freq_ratio` frames, where
   freq_ratio = spec_size // mel_bins, then cut into `freq_ratio` pieces stacked along the
   frequency axis: a square "image" of spec_size x spec_size;
3. a patch embedding (one strided convolution, then a LayerNorm); with fusion, the clips marked
   longer also embed their three crops with a wider convolution and mix them into the global
   patches with an attentional feature fusion block (AFF: local and global channel attention);
4. Swin stages: windowed self-attention with a learned relative position bias, every second
   block on windows shifted by half a window (a mask keeps apart what the roll brought together),
   a patch merging (2x2 -> one token of twice the width) between stages;
5. a final LayerNorm and the mean over all tokens: the pooled vector.

Only what the published CLAP checkpoints (laion/clap-htsat-unfused, laion/clap-htsat-fused) use
is built: square patches with a stride equal to their size, one input channel, a grid that the
windows tile exactly, fusion of the "aff_2d" kind. Other settings are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP

SHIFT_MASK_VALUE = -100.0  # what Swin adds between positions of different regions of a shifted window


@dataclass
class HTSATConfig:
    mel_bins: int = 64  # frequency bins of the input features
    spec_size: int = 256  # side of the square the spectrogram is folded into
    patch_size: int = 4  # square patches, stride = patch_size
    width: int = 96  # width of the first stage (each later stage doubles it)
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])  # blocks per stage
    heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # attention heads per stage
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-5  # of the blocks' norms (the patch, merging and final norms keep 1e-5)
    patch_norm: bool = True  # a LayerNorm after the patch embedding
    fusion: bool = False  # attentional feature fusion of the crops of clips longer than the window
    fusion_ratio: int = 4  # channel reduction inside the fusion block

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.mel_bins

    @property
    def out_width(self) -> int:
        return self.width * 2 ** (len(self.depths) - 1)

    def resolutions(self) -> list[int]:
        """The side of the token grid in each stage."""
        grid = self.spec_size // self.patch_size
        return [grid // 2**i for i in range(len(self.depths))]

    def validate(self) -> None:
        problems = []
        if self.spec_size % self.mel_bins:
            problems.append(f"spec_size {self.spec_size} is not a multiple of mel_bins {self.mel_bins}")
        if len(self.heads) != len(self.depths):
            problems.append(f"{len(self.depths)} stages (depths) but {len(self.heads)} head counts")
        if self.spec_size % (self.patch_size * 2 ** (len(self.depths) - 1)):
            problems.append(f"spec_size {self.spec_size} does not halve evenly through {len(self.depths)} stages of "
                            f"{self.patch_size}-patches")
        for stage, side in enumerate(self.resolutions() if not problems else []):
            window = min(self.window_size, side)
            if side % window:
                problems.append(f"stage {stage}'s {side}x{side} grid is not tiled by {window}x{window} windows "
                                f"(window_size {self.window_size})")
        for stage, heads in enumerate(self.heads):
            if (self.width * 2**stage) % heads:
                problems.append(f"stage {stage}'s width {self.width * 2**stage} does not split into {heads} heads")
        if problems:
            raise ValueError("unsupported HTSAT settings: " + "; ".join(problems))


class HTSATOutput(NamedTuple):
    tokens: torch.Tensor  # (B, N, C) after the final norm
    pooled: torch.Tensor  # (B, C): the mean of the tokens


class WindowAttention(nn.Module):
    """Self-attention inside each window, with a learned bias per relative offset and head."""

    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.window = heads, window
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        self.relative_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B * nW, w*w, C); mask (nW, w*w, w*w) additive, for shifted windows."""
        B, N, C = x.shape
        q, k, v = (proj(x).view(B, N, self.heads, C // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        bias = self.relative_bias[self.relative_index.view(-1)].view(N, N, self.heads).permute(2, 0, 1)  # (H, N, N)
        bias = bias.unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask[None, :, None]).reshape(-1, self.heads, N, N)  # (nW, H, N, N)
            bias = bias.repeat(B // windows, 1, 1, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.out(y.transpose(1, 2).reshape(B, N, C))


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w): the index into the bias table of each pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w*w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def merge_windows(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """(B * nW, w*w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w): 0 within a region of the rolled grid, SHIFT_MASK_VALUE across regions."""
    index = torch.arange(side)
    region = (index >= side - window).long() + (index >= side - shift).long()
    grid = (region[:, None] * 3 + region[None, :]).float()[None, :, :, None]  # (1, H, W, 1)
    labels = partition(grid, window).squeeze(-1)  # (nW, w*w)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, SHIFT_MASK_VALUE)


class SwinBlock(nn.Module):
    """x = x + window_attention(norm1(x)) (windows shifted by `shift`); x = x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, side: int, window: int, shift: int, config: HTSATConfig):
        super().__init__()
        if side <= window:  # one window covers the grid: no shift (as Swin does)
            window, shift = side, 0
        self.side, self.window, self.shift = side, window, shift
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = WindowAttention(dim, heads, window, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = MLP(dim, int(config.mlp_ratio * dim), config.act)
        mask = shift_mask(side, window, shift) if shift else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        y = self.norm1(x).view(B, self.side, self.side, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(partition(y, self.window), self.mask)
        y = merge_windows(y, self.window, self.side, self.side)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(B, N, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Each 2x2 group of tokens -> one token: concatenated (4C), normed, mapped to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        B, _, C = x.shape
        x = x.view(B, side, side, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, side: int, config: HTSATConfig, merge: bool):
        super().__init__()
        self.side = side
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, side, config.window_size, 0 if i % 2 == 0 else config.window_size // 2, config)
            for i in range(depth))
        self.merge = PatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.merge is None else self.merge(x, self.side)


class FeatureFusion(nn.Module):
    """Attentional feature fusion (AFF, 2-D): a channel attention from local (per position) and
    global (pooled) branches weighs the global patches against the crops' patches."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        inner = channels // ratio
        self.local_att = nn.Sequential(
            nn.Conv2d(channels, inner, 1), nn.BatchNorm2d(inner), nn.ReLU(),
            nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))
        self.global_att = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, inner, 1), nn.BatchNorm2d(inner), nn.ReLU(),
            nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        both = x + residual
        weight = torch.sigmoid(self.local_att(both) + self.global_att(both))
        return 2 * x * weight + 2 * residual * (1 - weight)


class PatchEmbed(nn.Module):
    def __init__(self, config: HTSATConfig):
        super().__init__()
        p = config.patch_size
        self.spec_size = config.spec_size
        self.proj = nn.Conv2d(1, config.width, p, stride=p)
        self.norm = nn.LayerNorm(config.width) if config.patch_norm else nn.Identity()
        self.fusion = FeatureFusion(config.width, config.fusion_ratio) if config.fusion else None
        self.crop_proj = nn.Conv2d(1, config.width, (p, 3 * p), stride=(p, 3 * p)) if config.fusion else None

    def forward(self, image: torch.Tensor, longer: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, C, S, S) -> patches (B, N, width). With fusion, channel 0 is the whole clip and
        channels 1-3 its crops, fused in the rows where `longer` (B,) is true."""
        if self.fusion is None:
            if image.shape[1] != 1:
                raise ValueError(f"this HTSAT has no fusion and reads one spectrogram per clip, got {image.shape[1]} "
                                 "channels (features computed with truncation='fusion' are for fused models)")
            return self.norm(self.proj(image).flatten(2).transpose(1, 2))
        if image.shape[1] != 4:
            raise ValueError(f"a fused HTSAT reads 4 spectrograms per clip (whole, and three crops), got {image.shape[1]}")
        patches = self.proj(image[:, :1])
        rows = torch.nonzero(longer.reshape(-1).bool()).flatten() if longer is not None else None
        if rows is not None and len(rows):
            crops = image[rows, 1:]
            b, n, h, w = crops.shape
            crops = self.crop_proj(crops.reshape(b * n, 1, h, w))
            _, c, h, w = crops.shape
            crops = crops.view(b, n, c, h, w).permute(0, 2, 3, 1, 4).flatten(3)  # crops side by side in time
            crops = F.pad(crops, (0, patches.shape[-1] - crops.shape[-1]))
            patches = patches.index_put((rows,), self.fusion(patches[rows], crops))
        return self.norm(patches.flatten(2).transpose(1, 2))


class HTSAT(nn.Module):
    def __init__(self, config: HTSATConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.input_norm = nn.BatchNorm2d(config.mel_bins)
        self.patch_embed = PatchEmbed(config)
        sides = config.resolutions()
        self.stages = nn.ModuleList(
            SwinStage(config.width * 2**i, depth, config.heads[i], sides[i], config, merge=i < len(config.depths) - 1)
            for i, depth in enumerate(config.depths))
        self.final_norm = nn.LayerNorm(config.out_width)

    def fold(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) normalised frames -> (B, C, S, S): time stretched to S * r frames, cut into
        r pieces stacked along frequency (r = freq_ratio)."""
        B, C, T, Fr = features.shape
        r, S = self.config.freq_ratio, self.config.spec_size
        if Fr != self.config.mel_bins:
            raise ValueError(f"features have {Fr} mel bins; the model reads {self.config.mel_bins}")
        if T > S * r:
            raise ValueError(f"{T} frames are more than the model reads ({S * r}); use the model's feature extractor")
        if T < S * r:
            features = F.interpolate(features, (S * r, Fr), mode="bicubic", align_corners=True)
        T = S * r
        return features.reshape(B, C * r, T // r, Fr).permute(0, 1, 3, 2).reshape(B, C, Fr * r, T // r)

    def forward(self, features: torch.Tensor, longer: torch.Tensor | None = None) -> HTSATOutput:
        """features (B, C, T, mel_bins) log-mel frames; longer (B,) or (B, 1): which clips were longer
        than the model's window (used by fused models only)."""
        x = self.input_norm(features.transpose(1, 3)).transpose(1, 3)
        x = self.patch_embed(self.fold(x), longer)
        for stage in self.stages:
            x = stage(x)
        x = self.final_norm(x)
        return HTSATOutput(x, x.mean(dim=1))
