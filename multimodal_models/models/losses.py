"""Image-text alignment losses: CLIP's softmax InfoNCE and SigLIP's pairwise sigmoid loss.

Each loss is a pure function of the two embedding batches and the temperature (and bias),
plus a thin module that holds those learnable scalars. Row i of the image batch and row i
of the text batch are a matching pair; every other row is a negative. The text batch may
hold N more rows than the image batch: extra negatives for the images (hard negatives, as
NegCLIP adds captions with swapped words), which take part on the image->text side only.

Shapes: B batch, N extra negative texts, E embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021).

    image_embeds (B, E), text_embeds (B + N, E) are L2-normalised here (a no-op if they
    already are); logits = exp(logit_scale) * img @ txt.T (B, B + N); the loss is the mean
    of the image->text cross-entropy (over all B + N texts) and the text->image one (the B
    paired texts over the B images), with the diagonal as targets.
    """
    image = F.normalize(image_embeds, dim=-1)
    text = F.normalize(text_embeds, dim=-1)
    logits = torch.as_tensor(logit_scale, dtype=image.dtype, device=image.device).exp() * image @ text.T  # (B, B+N)
    B = logits.shape[0]
    targets = torch.arange(B, device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :B].T, targets)) / 2


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023), normalised as in big_vision.

    logits = exp(logit_scale) * img @ txt.T + logit_bias (B, B) on L2-normalised
    embeddings; labels are +1 on the diagonal and -1 elsewhere. The loss is
    -mean_i sum_j log sigmoid(label_ij * logit_ij): summed over the B texts of each image,
    averaged over the B images (big_vision's `trainers/proj/image_text/siglip.py`, i.e. the
    paper's -1/|B| sum_i sum_j). It is therefore not a mean over the B*B pairs, and grows
    with the batch size.
    """
    image = F.normalize(image_embeds, dim=-1)
    text = F.normalize(text_embeds, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=image.dtype, device=image.device).exp()
    logits = scale * image @ text.T + logit_bias  # (B, B+N)
    labels = 2 * torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum(dim=1).mean()


class ContrastiveLoss(nn.Module):
    """Holds CLIP's learnable temperature: logit_scale = log(1 / 0.07) at init, used clamped to <= log(100)."""

    def __init__(self, init_scale: float = math.log(1 / 0.07), max_scale: float = math.log(100.0)):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.max_scale = max_scale  # CLIP caps the logit multiplier exp(logit_scale) at 100

    def scale(self) -> torch.Tensor:
        """The log-temperature actually used (clamped; the gradient stops at the cap)."""
        return self.logit_scale.clamp(max=self.max_scale)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, E), (B_txt, E), both normalised -> (B_img, B_txt) scaled cosine similarities."""
        return self.scale().exp() * image_embeds @ text_embeds.T

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return clip_loss(image_embeds, text_embeds, self.scale())


class SigmoidLoss(nn.Module):
    """Holds SigLIP's learnable temperature (log 10 at init) and bias (-10 at init)."""

    def __init__(self, init_scale: float = math.log(10.0), init_bias: float = -10.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, E), (B_txt, E), both normalised -> (B_img, B_txt) pair logits; sigmoid gives P(match)."""
        return self.logit_scale.exp() * image_embeds @ text_embeds.T + self.logit_bias

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return siglip_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
