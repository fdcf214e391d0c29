"""Three ways to combine an image and a text into one vector, behind one interface.

Every fusion is an `nn.Module` with an `out_dim` attribute and

    forward(image: VisionOutput, text: TextOutput, text_mask (B, T) with 1 on real tokens) -> (B, out_dim)

- `EarlyFusion`: one transformer over [CLS; text tokens; image tokens] (single-stream, as
  in ViLT); the output is the CLS token.
- `CrossAttentionFusion` (middle fusion): text layers that self-attend and cross-attend to
  the image tokens (as in Flamingo / ALBEF's fusion encoder); the output is the mean of
  the real text tokens.
- `LateFusion`: only the two pooled vectors meet, at the decision layer ("concat",
  "product" or "gated").

They know nothing of heads, losses or trainers. Shapes: B batch, T text tokens, N image
tokens, C width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import TransformerBlock, init_weights
from .text import TextOutput
from .vision import VisionOutput

FUSION_KINDS = ("early", "middle", "late")
LATE_MODES = ("concat", "product", "gated")


@dataclass
class FusionConfig:
    kind: str = "middle"  # "early" (one joint transformer) | "middle" (cross-attention) | "late" (pooled vectors)
    width: int = 256  # the fusion's working width, and its output width (out_dim)
    depth: int = 2  # transformer blocks (early / middle; unused by late)
    heads: int = 4
    mlp_ratio: float = 4.0
    late_mode: str = "concat"  # late fusion only: "concat" | "product" | "gated"
    dropout: float = 0.0

    def validate(self) -> None:
        if self.kind not in FUSION_KINDS:
            raise ValueError(f"unknown fusion kind {self.kind!r}; expected one of {FUSION_KINDS}")
        if self.late_mode not in LATE_MODES:
            raise ValueError(f"unknown late_mode {self.late_mode!r}; expected one of {LATE_MODES}")
        if self.kind != "late" and self.width % self.heads:
            raise ValueError(f"fusion width {self.width} is not divisible by heads {self.heads}")


def _key_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, S) with 1/True on tokens that may be attended to -> boolean (B, 1, 1, S) attention mask."""
    return keep.bool()[:, None, None, :]


class EarlyFusion(nn.Module):
    """One transformer over [CLS; text; image]; each modality is projected to `width` and tagged
    with a learned modality embedding. Padding text tokens are masked out as keys."""

    def __init__(self, image_dim: int, text_dim: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.out_dim = width
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.text_proj = nn.Linear(text_dim, width)
        self.image_proj = nn.Linear(image_dim, width)
        self.text_type = nn.Parameter(torch.zeros(1, 1, width))  # modality embeddings
        self.image_type = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, int(width * mlp_ratio), dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        init_weights(self)
        for p in (self.cls, self.text_type, self.image_type):
            nn.init.normal_(p, std=0.02)

    def forward(self, image: VisionOutput, text: TextOutput, text_mask: torch.Tensor) -> torch.Tensor:
        B = text.tokens.shape[0]
        t = self.text_proj(text.tokens) + self.text_type  # (B, T, C)
        v = self.image_proj(image.tokens) + self.image_type  # (B, N, C)
        x = torch.cat([self.cls.expand(B, -1, -1), t, v], dim=1)  # (B, 1 + T + N, C)
        ones = text_mask.new_ones(B, 1)
        keep = torch.cat([ones, text_mask, ones.expand(B, v.shape[1])], dim=1)  # (B, 1 + T + N)
        mask = _key_mask(keep)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x[:, 0])  # (B, C)


class CrossAttentionFusion(nn.Module):
    """Text layers: self-attention over the real text tokens, cross-attention to every image
    token, MLP. Output: the mean of the real text tokens after a final norm (chosen over the
    first token because it does not rely on one position collecting the whole answer)."""

    def __init__(self, image_dim: int, text_dim: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.out_dim = width
        self.text_proj = nn.Linear(text_dim, width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, int(width * mlp_ratio), context_dim=image_dim, dropout=dropout)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        init_weights(self)

    def forward(self, image: VisionOutput, text: TextOutput, text_mask: torch.Tensor) -> torch.Tensor:
        x = self.text_proj(text.tokens)  # (B, T, C)
        mask = _key_mask(text_mask)
        for block in self.blocks:
            x = block(x, mask=mask, context=image.tokens)  # cross-attends to (B, N, image_dim)
        x = self.norm(x)
        weights = text_mask.to(x.dtype)[..., None]  # (B, T, 1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, C)


class LateFusion(nn.Module):
    """Pooled image and pooled text, each projected to `width`, combined by `mode`:

    - "concat":  MLP([img; txt])
    - "product": img * txt (elementwise)
    - "gated":   g * img + (1 - g) * txt with g = sigmoid(W [img; txt]) per dimension
    """

    def __init__(self, image_dim: int, text_dim: int, width: int, mode: str = "concat"):
        super().__init__()
        if mode not in LATE_MODES:
            raise ValueError(f"unknown late fusion mode {mode!r}; expected one of {LATE_MODES}")
        self.mode = mode
        self.out_dim = width
        self.image_proj = nn.Linear(image_dim, width)
        self.text_proj = nn.Linear(text_dim, width)
        if mode == "concat":
            self.mlp = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width))
        elif mode == "gated":
            self.gate = nn.Linear(2 * width, width)
        init_weights(self)

    def forward(self, image: VisionOutput, text: TextOutput, text_mask: torch.Tensor) -> torch.Tensor:
        v = self.image_proj(image.pooled)  # (B, C)
        t = self.text_proj(text.pooled)  # (B, C); padding is the text encoder's business (its pooling)
        if self.mode == "concat":
            return self.mlp(torch.cat([v, t], dim=-1))
        if self.mode == "product":
            return v * t
        g = torch.sigmoid(self.gate(torch.cat([v, t], dim=-1)))  # (B, C) in (0, 1)
        return g * v + (1 - g) * t


def build_fusion(config: FusionConfig, image_dim: int, text_dim: int) -> nn.Module:
    """The fusion `config.kind` names, taking image tokens of width `image_dim` and text of `text_dim`."""
    config.validate()
    c = config
    if c.kind == "early":
        return EarlyFusion(image_dim, text_dim, c.width, c.depth, c.heads, c.mlp_ratio, c.dropout)
    if c.kind == "middle":
        return CrossAttentionFusion(image_dim, text_dim, c.width, c.depth, c.heads, c.mlp_ratio, c.dropout)
    return LateFusion(image_dim, text_dim, c.width, c.late_mode)
