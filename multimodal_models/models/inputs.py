"""Turning user inputs (image files, PIL images, texts) into model tensors, shared by the models."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .pretrained import PretrainedModel


def tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device | str = "cpu", *,
             padding: str = "longest") -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> ids (B, T), attention_mask (B, T): the tokenizer's special tokens around each text
    (<bos> ... <eos> here, <|startoftext|> ... <|endoftext|> for CLIP), right-padded with the pad id.

    padding="longest": T is the longest text of the batch and the mask is 1 on real tokens.
    padding="max_length": T is max_length and the mask is all ones, for models trained to attend
    to their padding (SigLIP; see TextEncoderConfig.padding).
    A text longer than `max_length` tokens is an error (nothing is cut off silently).
    """
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got one string; wrap it in a list")
    if not texts:
        raise ValueError("no texts given (empty list)")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"unknown padding {padding!r}; expected 'longest' or 'max_length'")
    encoded = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    for text, ids in zip(texts, encoded):
        if len(ids) > max_length:
            raise ValueError(f"text {text[:60]!r} is {len(ids)} tokens long; the model reads at most {max_length}")
    T = max_length if padding == "max_length" else max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_id
    if pad_id is None and any(len(row) < T for row in encoded):
        raise ValueError("the texts need padding but the tokenizer has no pad token (tokenizer_config.json: pad_token)")
    ids = torch.full((len(encoded), T), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.full((len(encoded), T), int(padding == "max_length"), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def as_image_list(images) -> list:
    """One image (path, bytes, PIL image, uint8 array) or a sequence of them -> a list."""
    if isinstance(images, (str, bytes, bytearray, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    return list(images)


def preprocess_images(image_processor, images, image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A list of images (paths, bytes, PIL images, uint8 arrays) -> pixels (B, 3, S, S) on `device`."""
    pixels = image_processor(images)
    if tuple(pixels.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"the image processor makes {pixels.shape[-2]}x{pixels.shape[-1]} pixels but the model expects "
            f"{image_size}x{image_size}; set its size (and crop_size) to {image_size}"
        )
    return pixels.to(device)


def require_preprocessing(model: PretrainedModel, *, tokenizer: bool = False, image_processor: bool = False) -> None:
    """A clear error when a helper needs the tokenizer or image processor and none is attached."""
    for needed, name in ((tokenizer, "tokenizer"), (image_processor, "image_processor")):
        if needed and getattr(model, name) is None:
            raise RuntimeError(
                f"this {type(model).__name__} has no {name} attached; load it with from_pretrained(folder) "
                f"from a folder that has one, or set model.{name} yourself"
            )


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration; restores the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def embed_texts(model, texts: Sequence[str], *, batch_size: int, padding: str = "longest") -> torch.Tensor:
    """Texts -> (N, E) unit vectors on the CPU, by `model.encode_text(ids, mask)` in batches: the
    `embed_texts` of every dual encoder (image-text and audio-text)."""
    require_preprocessing(model, tokenizer=True)
    if isinstance(texts, str):
        raise TypeError("embed_texts expects a list of texts, got one string; wrap it in a list")
    texts = list(texts)
    out = []
    with evaluating(model):
        for start in range(0, max(len(texts), 1), batch_size):
            ids, mask = tokenize(model.tokenizer, texts[start : start + batch_size], model.config.text.max_length,
                                 model.device, padding=padding)
            out.append(model.encode_text(ids, mask).float().cpu())
    return torch.cat(out)
