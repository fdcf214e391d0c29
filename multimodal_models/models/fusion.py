"""Ways to combine an image and a text into one vector, behind one interface.

Every fusion is an `nn.Module` with an `out_dim` attribute and

    forward(image: VisionOutput, text: TextOutput, text_mask (B, T) with 1 on real tokens) -> (B, out_dim)

The image tokens are a grid, row by row (a class token, if any, first); `with_coordinates`
appends each token's (x, y) in [-1, 1], as CoordConv and the Relation Network do, so that a
fusion can say where things are relative to each other.

- `EarlyFusion`: one transformer over [CLS; text tokens; image tokens] (single-stream, as
  in ViLT); the output is the CLS token.
- `CrossAttentionFusion` (middle fusion): text layers that self-attend and cross-attend to
  the image tokens (as in Flamingo / ALBEF's fusion encoder); the output is the mean of
  the real text tokens.
- `LateFusion`: only the two pooled vectors meet, at the decision layer ("concat",
  "product" or "gated").

- `FiLMFusion`: the question scales and shifts the channels of residual conv blocks over the
  image's grid (Perez et al. 2018); the output is the max over the grid.
- `RelationFusion`: an MLP g over every pair of image tokens with the question, averaged, then
  an MLP f (the Relation Network, Santoro et al. 2017).

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

FUSION_KINDS = ("early", "middle", "late", "film", "relation")
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
    coordinates: bool = False  # append each image token's (x, y) to it before the fusion (the generic recipes do)
    token_pool: int = 1  # max-pool the image's grid k x k first (a relation fusion's pairs grow as tokens**2)

    def validate(self) -> None:
        if self.kind not in FUSION_KINDS:
            raise ValueError(f"unknown fusion kind {self.kind!r}; expected one of {FUSION_KINDS}")
        if self.late_mode not in LATE_MODES:
            raise ValueError(f"unknown late_mode {self.late_mode!r}; expected one of {LATE_MODES}")
        if self.kind in ("early", "middle") and self.width % self.heads:
            raise ValueError(f"fusion width {self.width} is not divisible by heads {self.heads}")
        if self.token_pool < 1:
            raise ValueError(f"fusion token_pool must be at least 1, got {self.token_pool}")

    @property
    def adds_coordinates(self) -> bool:
        """Whether the image tokens get their (x, y): late fusion reads only the pooled vector."""
        return self.coordinates and self.kind != "late"


def grid_coordinates(grid: int) -> torch.Tensor:
    """(grid * grid, 2): each cell's centre (x, y) in [-1, 1], row by row."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def pool_grid(tokens: torch.Tensor, grid: int, k: int) -> tuple[torch.Tensor, int]:
    """Max-pool the (B, grid * grid, C) tokens of a grid k x k -> (B, (grid / k)**2, C), and the new grid."""
    if k == 1:
        return tokens, grid
    if grid % k:
        raise ValueError(f"fusion token_pool {k} does not divide the image's grid of {grid} x {grid}")
    B, _, C = tokens.shape
    maps = tokens.transpose(1, 2).reshape(B, C, grid, grid)
    pooled = torch.nn.functional.max_pool2d(maps, k)
    return pooled.flatten(2).transpose(1, 2), grid // k


def with_coordinates(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, N, C) tokens of a grid (N = grid**2, or grid**2 + 1 with a class token first, which gets
    (0, 0)) -> (B, N, C + 2) with each token's (x, y) appended."""
    B, N, _ = tokens.shape
    coords = grid_coordinates(grid).to(tokens)
    if N == grid * grid + 1:
        coords = torch.cat([coords.new_zeros(1, 2), coords])
    elif N != grid * grid:
        raise ValueError(f"{N} image tokens do not make a {grid} x {grid} grid")
    return torch.cat([tokens, coords.expand(B, -1, -1)], dim=-1)


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


class FiLMBlock(nn.Module):
    """x + ReLU(FiLM(BN(conv3x3(ReLU(conv1x1(x)))))), with the batch norm's own scale and shift
    left to the question (FiLM's residual block)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(width, affine=False)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv2(torch.relu(self.conv1(x))))
        return x + torch.relu(gamma[..., None, None] * h + beta[..., None, None])


class FiLMFusion(nn.Module):
    """The question's pooled vector predicts a (gamma, beta) per channel for each of `depth`
    residual blocks over the image's grid; then conv1x1 + BN + ReLU and a max over the grid.
    Gammas are predicted around 1 (1 + a linear output initialised near 0), so a new model
    starts as plain residual blocks rather than zeroing the image."""

    def __init__(self, image_dim: int, text_dim: int, width: int, depth: int, grid: int):
        super().__init__()
        self.out_dim, self.width, self.depth, self.grid = width, width, depth, grid
        self.stem = nn.Sequential(nn.Conv2d(image_dim, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(FiLMBlock(width) for _ in range(depth))
        self.film = nn.Linear(text_dim, 2 * depth * width)
        self.head = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        init_weights(self)
        nn.init.normal_(self.film.weight, std=0.01)

    def forward(self, image: VisionOutput, text: TextOutput, text_mask: torch.Tensor) -> torch.Tensor:
        tokens = image.tokens[:, -self.grid * self.grid :]  # a class token, if any, is not on the grid
        B, N, C = tokens.shape
        x = self.stem(tokens.transpose(1, 2).reshape(B, C, self.grid, self.grid))
        film = self.film(text.pooled).view(B, self.depth, 2, self.width)
        for i, block in enumerate(self.blocks):
            x = block(x, 1 + film[:, i, 0], film[:, i, 1])
        return self.head(x).amax(dim=(2, 3))  # (B, width)


class RelationFusion(nn.Module):
    """mean over pairs (i, j) of g([o_i; o_j; q]), then f: the Relation Network. The first layer
    of g is linear in the concatenation, so it is computed as W1 o_i + W2 o_j + W3 q: per token
    and per question instead of per pair; only g's later layers run on all N**2 pairs."""

    def __init__(self, image_dim: int, text_dim: int, width: int, depth: int):
        super().__init__()
        self.out_dim = width
        self.left = nn.Linear(image_dim, width)
        self.right = nn.Linear(image_dim, width, bias=False)
        self.question = nn.Linear(text_dim, width, bias=False)
        g: list[nn.Module] = [nn.ReLU()]
        for _ in range(max(0, depth - 1)):
            g += [nn.Linear(width, width), nn.ReLU()]
        self.g = nn.Sequential(*g)
        self.f = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        for m in self.modules():  # ReLU MLPs: He initialisation keeps the pair sum's scale
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, image: VisionOutput, text: TextOutput, text_mask: torch.Tensor) -> torch.Tensor:
        o = image.tokens  # (B, N, D)
        pairs = (self.left(o)[:, :, None] + self.right(o)[:, None, :]
                 + self.question(text.pooled)[:, None, None])  # (B, N, N, C)
        return self.f(self.g(pairs).mean(dim=(1, 2)))  # (B, C)


def build_fusion(config: FusionConfig, image_dim: int, text_dim: int, grid: int | None = None) -> nn.Module:
    """The fusion `config.kind` names, taking image tokens of width `image_dim` and text of `text_dim`;
    `grid`: the side of the image tokens' grid, after `token_pool` (the FiLM fusion needs it)."""
    config.validate()
    c = config
    if c.kind == "film":
        if grid is None:
            raise ValueError("the film fusion needs image tokens on a square grid")
        return FiLMFusion(image_dim, text_dim, c.width, c.depth, grid)
    if c.kind == "relation":
        return RelationFusion(image_dim, text_dim, c.width, c.depth)
    if c.kind == "early":
        return EarlyFusion(image_dim, text_dim, c.width, c.depth, c.heads, c.mlp_ratio, c.dropout)
    if c.kind == "middle":
        return CrossAttentionFusion(image_dim, text_dim, c.width, c.depth, c.heads, c.mlp_ratio, c.dropout)
    return LateFusion(image_dim, text_dim, c.width, c.late_mode)
