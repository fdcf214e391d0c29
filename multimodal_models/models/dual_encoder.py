"""A CLIP/SigLIP-style dual encoder: an image tower and a text tower meeting in one embedding space.

Both towers end in a linear projection of their pooled vector (bias-free, as CLIP's; SigLIP's
text head has a bias and its image embedding is the pooled vector itself: see the config); the
embeddings are L2-normalised, so a dot product is a cosine similarity. Training aligns matching
image-text pairs with CLIP's softmax InfoNCE or SigLIP's pairwise sigmoid loss (`config.loss`):
the model holds the loss's learnable temperature (`criterion`), and the training task applies it
to the embeddings that `forward` returns. The user-level helpers (`embed_images`, `embed_texts`, `classify`) use
the tokenizer and image processor that travel with the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.hf_tokenizer import (
    HFTokenizer,
    SiglipSentencePieceTokenizer,
    checkpoint_tokenizer,
)
from ..data.preprocess import ImageProcessor
from .inputs import (
    as_image_list,
    embed_texts,
    evaluating,
    preprocess_images,
    require_preprocessing,
)
from .losses import ContrastiveLoss, SigmoidLoss
from .pretrained import PretrainedModel
from .templates import CLIP_IMAGENET_TEMPLATES, CLIP_IMAGENET_TEMPLATES_7
from .text import TextEncoder, TextEncoderConfig
from .vision import VisionConfig, VisionTransformer

LOSSES = ("clip", "siglip")
IMAGE_PROJECTIONS = ("linear", "none")
PROMPT_SETS = ("imagenet", "imagenet7")

# A few of the generic ImageNet prompts from the CLIP paper's prompt-ensembling study, for real photos.
# All 80 of them (and the 7 its forward selection kept) are in multimodal_models.models.templates.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "itap of a {}.",
    "art of the {}.",
    "a rendering of a {}.",
)


@dataclass
class DualEncoderConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 256  # width of the shared image-text embedding space
    loss: str = "clip"  # "clip" (softmax InfoNCE, learnable temperature) | "siglip" (sigmoid, temperature + bias)
    # "linear": a bias-free linear map of the pooled image vector (CLIP) | "none": the pooled vector is the
    # embedding (SigLIP; needs vision.width == embed_dim)
    image_projection: str = "linear"
    text_projection_bias: bool = False  # SigLIP's text head is a linear layer with a bias
    # Cap on the learned log-temperature for the "clip" loss (CLIP clamps exp(logit_scale) at 100);
    # None: no cap, as transformers' CLIPModel applies none (checkpoints imported from it)
    max_logit_scale: float | None = math.log(100.0)
    # classify()'s default prompts: "imagenet" (the CLIP paper's 80
    # ImageNet templates) | "imagenet7" (the 7 of them its forward selection kept)
    prompts: str = "imagenet"


class DualEncoderOutput(NamedTuple):
    image_embeds: torch.Tensor  # (B, E), L2-normalised
    text_embeds: torch.Tensor  # (B, E), L2-normalised
    logits_per_image: torch.Tensor  # (B, B): row i scores image i against every text
    negative_embeds: torch.Tensor | None  # (N, E) the extra captions that match no image, where given
    image_tokens: torch.Tensor  # (B, N, C) the vision tower's tokens (for dense heads built on it)


# --- the model ----------------------------------------------------------------------------


class DualEncoder(PretrainedModel):
    model_type = "dual_encoder"
    config_class = DualEncoderConfig
    prompt_sets: tuple[str, ...] = PROMPT_SETS  # a subclass may know more (default_templates)

    def __init__(self, config: DualEncoderConfig):
        super().__init__(config)
        if config.loss not in LOSSES:
            raise ValueError(f"unknown loss {config.loss!r}; expected one of {LOSSES}")
        if config.prompts not in self.prompt_sets:
            raise ValueError(f"unknown prompts {config.prompts!r}; expected one of {self.prompt_sets}")
        if config.image_projection not in IMAGE_PROJECTIONS:
            raise ValueError(f"unknown image_projection {config.image_projection!r}; "
                             f"expected one of {IMAGE_PROJECTIONS}")
        if config.image_projection == "none" and config.vision.width != config.embed_dim:
            raise ValueError(f"image_projection='none' needs vision.width ({config.vision.width}) == embed_dim "
                             f"({config.embed_dim})")
        self.vision = VisionTransformer(config.vision)
        self.text = TextEncoder(config.text)
        if config.image_projection == "linear":
            self.image_projection = nn.Linear(config.vision.width, config.embed_dim, bias=False)
            nn.init.normal_(self.image_projection.weight, std=config.vision.width**-0.5)
        else:
            self.image_projection = nn.Identity()
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=config.text_projection_bias)
        nn.init.normal_(self.text_projection.weight, std=config.text.width**-0.5)
        if config.text_projection_bias:
            nn.init.zeros_(self.text_projection.bias)
        if config.loss == "clip":
            cap = math.inf if config.max_logit_scale is None else config.max_logit_scale
            self.criterion = ContrastiveLoss(max_scale=cap)
        else:
            self.criterion = SigmoidLoss()

    # -- tensors in, tensors out ---------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), preprocessed -> (B, E) unit vectors."""
        return self.embed_pooled(self.vision(pixels).pooled)

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The vision tower's pooled vectors (B, C) -> (B, E) unit vectors in the shared space."""
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T), attention_mask (B, T) with 1 on real tokens -> (B, E) unit vectors."""
        return F.normalize(self.text_projection(self.text(ids, attention_mask).pooled), dim=-1)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, E), (B_txt, E) -> (B_img, B_txt): scaled cosine similarity (+ bias for SigLIP)."""
        return self.criterion.logits(image_embeds, text_embeds)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                negative_ids: torch.Tensor | None = None,
                negative_mask: torch.Tensor | None = None) -> DualEncoderOutput:
        """Pairs (pixels[i], ids[i]); negative_ids (N, T) are extra captions that match no image.
        The training task computes the alignment loss with `model.criterion` (which holds the learnable
        temperature) over the text embeddings followed by the negatives'."""
        vision = self.vision(pixels)
        image_embeds = self.embed_pooled(vision.pooled)
        text_embeds = self.encode_text(ids, attention_mask)
        negatives = None if negative_ids is None else self.encode_text(negative_ids, negative_mask)
        return DualEncoderOutput(image_embeds, text_embeds, self.logits(image_embeds, text_embeds), negatives,
                                 vision.tokens)

    def grid_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The vision tower's tokens without its class token: one per patch of the grid."""
        return tokens[:, int(self.config.vision.class_token):]

    # -- user-level helpers --------------------------------------------------------------

    def embed_images(self, images: Sequence, *, batch_size: int = 64) -> torch.Tensor:
        """Images (paths, encoded bytes, PIL images, uint8 arrays) -> (N, E) unit vectors on the CPU.
        A single image is taken as a list of one."""
        require_preprocessing(self, image_processor=True)
        images = as_image_list(images)
        if not images:
            raise ValueError("no images given (empty list)")
        out = []
        with evaluating(self):
            for start in range(0, len(images), batch_size):
                pixels = preprocess_images(self.image_processor, images[start : start + batch_size],
                                           self.config.vision.image_size, self.device)
                out.append(self.encode_image(pixels).float().cpu())
        return torch.cat(out)

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, E) unit vectors on the CPU."""
        return embed_texts(self, texts, batch_size=batch_size, padding=self.config.text.padding)

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """One zero-shot classifier vector per label (L, E): the mean of its normalised
        template embeddings, renormalised (CLIP's prompt ensembling)."""
        if isinstance(labels, str) or not labels:
            raise ValueError("labels must be a non-empty list of label names")
        templates = self.default_templates() if templates is None else tuple(templates)
        if isinstance(templates, str) or not templates:
            raise ValueError("templates must be a non-empty list such as ['a photo of a {}.']")
        for template in templates:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' where the label goes")
        prompts = [template.format(label) for label in labels for template in templates]
        embeds = self.embed_texts(prompts).view(len(labels), len(templates), -1)  # (L, K, E)
        return F.normalize(embeds.mean(dim=1), dim=-1)

    def classify(self, image, labels: Sequence[str], templates: Sequence[str] | None = None
                 ) -> list[tuple[str, float]]:
        """Zero-shot classification of one image: [(label, probability)] in the order of `labels`.

        CLIP loss: softmax over exp(logit_scale) * cosine, so the probabilities sum to 1.
        SigLIP loss: sigmoid(exp(logit_scale) * cosine + bias) per label, each an independent
        probability that the label matches (they need not sum to 1).
        `templates` default to the config's `prompts` set: the CLIP paper's 80 ImageNet templates, or
        the 7 its forward selection kept (a subclass may name its own, as ShapesCLIP does).
        """
        classes = self.label_embeddings(labels, templates)  # (L, E)
        image_embed = self.embed_images([image])  # (1, E)
        with evaluating(self):
            ref = self.criterion.logit_scale  # embeddings back to the model's device and dtype
            logits = self.logits(image_embed.to(ref), classes.to(ref))[0].float().cpu()  # (L,)
        probs = logits.softmax(dim=-1) if self.config.loss == "clip" else torch.sigmoid(logits)
        return [(label, float(p)) for label, p in zip(labels, probs)]

    def default_templates(self) -> tuple[str, ...]:
        """The prompt templates named by `config.prompts`."""
        return CLIP_IMAGENET_TEMPLATES if self.config.prompts == "imagenet" else CLIP_IMAGENET_TEMPLATES_7

    def attach_preprocessing(self, directory: Path) -> None:
        """As the base class does, except that a tokenizer saved with its tokenizer_config.json (one
        imported from a Hugging Face checkpoint) comes back as an HFTokenizer, or as SigLIP's
        SentencePiece tokenizer."""
        if not (HFTokenizer.saved_in(directory) or SiglipSentencePieceTokenizer.saved_in(directory)):
            return super().attach_preprocessing(directory)
        self.tokenizer = checkpoint_tokenizer(directory)
        if (directory / "preprocessor_config.json").is_file():
            self.image_processor = ImageProcessor.from_pretrained(directory)
