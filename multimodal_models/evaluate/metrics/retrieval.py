"""Cross-modal retrieval metrics: Recall@K and median rank, both directions.

Definitions (CLIP paper; LAION-AI/CLIP_benchmark clip_benchmark/metrics/zeroshot_retrieval.py),
for a similarity matrix S[n_images, n_texts] (higher = more similar) where each text
belongs to exactly one image and an image may have several texts (COCO has 5):

- text -> image ("image retrieval"): every text is a query; its rank is the 1-based
  position of its own image among all images. CLIP_benchmark: image_retrieval_recall@K.
- image -> text ("text retrieval"): every image is a query; its rank is the 1-based
  position of the FIRST of its texts among all texts. CLIP_benchmark: text_retrieval_recall@K.
- R@K = 100 * share of queries whose rank is <= K (percent).
- median_rank = floor(median of the ranks), the "MedR" of VSE++ / Karpathy-split
  evaluation code (floor(median(0-based ranks)) + 1); an integer-valued float.

Ties. A rank is counted, not sorted for: rank = 1 + number of wrong candidates that are
ranked ahead of the best correct one. With ties="pessimistic" (default) a wrong candidate
whose score EQUALS the correct one's is counted as ahead of it: ties always go against
the model, so a degenerate model (all scores equal) gets rank n, not rank 1. With
ties="optimistic" only strictly greater scores count (ties go to the model). Without ties
both agree with CLIP_benchmark, whose torch.topk leaves the order of tied scores
unspecified. Ties between two correct texts of one image do not matter.

The computation runs over blocks of at most `chunk_elements` scores, so 100k texts x 10k
images never needs a full sort or a full boolean copy of the matrix. NumPy arrays (and
memmaps) and torch tensors (any device, any float dtype) are accepted; torch is never
imported by this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

TIES = ("pessimistic", "optimistic")
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # scores per block (16 MiB of float32)


def _block_to_numpy(block) -> np.ndarray:
    """A slice of the similarity matrix as a NumPy array (torch tensors by duck typing)."""
    if hasattr(block, "detach") and hasattr(block, "cpu"):
        block = block.detach()
        if block.is_floating_point() and block.element_size() < 4:  # bf16 / fp16: exact upcast
            block = block.float()
        block = block.cpu().numpy()
    block = np.asarray(block)
    if block.dtype.kind == "f" and np.isnan(block).any():
        raise ValueError("the similarity matrix contains NaN: ranks would be meaningless")
    if block.dtype.kind not in "fiu":
        raise ValueError(f"similarity scores must be numbers, got dtype {block.dtype}")
    return block


def _as_sliceable(similarity):
    """Arrays and tensors as they are (no copy); nested lists become a NumPy array."""
    return similarity if hasattr(similarity, "shape") else np.asarray(similarity)


def _check_inputs(similarity, text_to_image) -> tuple[int, int, np.ndarray]:
    shape = tuple(similarity.shape)
    if len(shape) != 2:
        raise ValueError(f"similarity must be a 2-D [n_images, n_texts] array, got shape {shape}")
    n_images, n_texts = shape
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"similarity is empty (shape {shape})")
    if hasattr(text_to_image, "detach"):
        text_to_image = text_to_image.detach().cpu().numpy()
    owners = np.asarray(text_to_image)
    if owners.ndim != 1 or owners.shape[0] != n_texts:
        raise ValueError(f"text_to_image must have one image index per text ({n_texts}), got shape {owners.shape}")
    if owners.dtype.kind not in "iu":
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {owners.dtype}")
    bad = np.flatnonzero((owners < 0) | (owners >= n_images))
    if bad.size:
        raise ValueError(
            f"text_to_image points outside 0..{n_images - 1} for text(s) {bad[:10].tolist()}"
            f" (values {owners[bad[:10]].tolist()})"
        )
    textless = np.flatnonzero(np.bincount(owners, minlength=n_images) == 0)
    if textless.size:
        raise ValueError(
            f"{textless.size} image(s) have no text, so image->text recall is undefined for them: "
            f"{textless[:10].tolist()}{' ...' if textless.size > 10 else ''}"
        )
    return n_images, n_texts, owners.astype(np.int64)


def text_to_image_ranks(
    similarity, text_to_image, *, ties: str = "pessimistic", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> np.ndarray:
    """1-based rank of each text's own image among all images (see the module docstring for ties)."""
    _check_ties(ties)
    similarity = _as_sliceable(similarity)
    n_images, n_texts, owners = _check_inputs(similarity, text_to_image)
    step = max(1, chunk_elements // n_images)
    ranks = np.empty(n_texts, dtype=np.int64)
    for start in range(0, n_texts, step):
        stop = min(start + step, n_texts)
        block = _block_to_numpy(similarity[:, start:stop])  # (n_images, b)
        own = block[owners[start:stop], np.arange(stop - start)]  # (b,)
        if ties == "pessimistic":
            ahead = (block >= own).sum(axis=0) - 1  # every image >= own, except the own image
        else:
            ahead = (block > own).sum(axis=0)
        ranks[start:stop] = ahead + 1
    return ranks


def image_to_text_ranks(
    similarity, text_to_image, *, ties: str = "pessimistic", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> np.ndarray:
    """1-based rank of the first correct text of each image among all texts (see the module docstring)."""
    _check_ties(ties)
    similarity = _as_sliceable(similarity)
    n_images, n_texts, owners = _check_inputs(similarity, text_to_image)
    step = max(1, chunk_elements // n_texts)
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, step):
        stop = min(start + step, n_images)
        block = _block_to_numpy(similarity[start:stop])  # (r, n_texts)
        correct = owners[None, :] == np.arange(start, stop)[:, None]  # (r, n_texts)
        best = np.where(correct, block, -np.inf).max(axis=1, keepdims=True)  # (r, 1) best correct score
        if ties == "pessimistic":
            ahead = ((block >= best) & ~correct).sum(axis=1)
        else:
            ahead = (block > best).sum(axis=1)  # no correct text can beat the best one
        ranks[start:stop] = ahead + 1
    return ranks


def summarize_ranks(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """{"R@K": percent of ranks <= K for each K, "median_rank": floor(median rank)}."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": 100.0 * float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.floor(np.median(ranks)))
    return out


def retrieval_metrics(
    similarity,
    text_to_image,
    ks: Sequence[int] = (1, 5, 10),
    *,
    ties: str = "pessimistic",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, dict[str, float]]:
    """Recall@K (percent, 0..100) and median rank for both retrieval directions.

    similarity: [n_images, n_texts] scores, higher = more similar (numpy or torch).
    text_to_image: [n_texts] integer index of each text's image; every image needs >= 1 text.
    ties: "pessimistic" (a wrong candidate scoring exactly as the correct one ranks ahead of
    it; the default) or "optimistic" (only strictly higher scores rank ahead).

    Returns {"image_to_text": {"R@1", "R@5", "R@10", "median_rank"}, "text_to_image": {...}}.
    """
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    options = {"ties": ties, "chunk_elements": chunk_elements}
    return {
        "image_to_text": summarize_ranks(image_to_text_ranks(similarity, text_to_image, **options), ks),
        "text_to_image": summarize_ranks(text_to_image_ranks(similarity, text_to_image, **options), ks),
    }


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
