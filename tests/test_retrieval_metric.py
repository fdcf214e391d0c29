"""Retrieval Recall@K / median rank: hand-computed cases, ties, and reference computations."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal_models.evaluate.metrics import retrieval
from multimodal_models.evaluate.metrics.retrieval import (
    image_to_text_ranks,
    retrieval_metrics,
    text_to_image_ranks,
)

torch.set_num_threads(1)

# 3 images, 2 captions each (texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2).
# Ties on purpose: text 0 scores 0.9 with images 0 and 1, text 4 scores 0.6 with images 0
# and 2, image 0 scores 0.9 with texts 0 (its own) and 2, image 1 scores 0.8 with texts 3
# (its own) and 4, image 2 scores 0.6 with both of its own texts.
S = np.array(
    [
        [0.9, 0.1, 0.9, 0.2, 0.6, 0.0],
        [0.9, 0.5, 0.4, 0.8, 0.8, 0.1],
        [0.2, 0.7, 0.1, 0.1, 0.6, 0.6],
    ],
    dtype=np.float32,
)
T2I = np.array([0, 0, 1, 1, 2, 2])


def test_hand_computed_ranks():
    # text -> image, rank = 1 + wrong images ahead of the own image:
    #   t0: own 0.9, image 1 ties (0.9)          pessimistic 2, optimistic 1
    #   t1: own 0.1, images 1 (0.5), 2 (0.7)     3, 3
    #   t2: own 0.4, image 0 (0.9)               2, 2
    #   t3: own 0.8                              1, 1
    #   t4: own 0.6, image 1 (0.8), image 0 ties 3, 2
    #   t5: own 0.6                              1, 1
    assert text_to_image_ranks(S, T2I).tolist() == [2, 3, 2, 1, 3, 1]
    assert text_to_image_ranks(S, T2I, ties="optimistic").tolist() == [1, 3, 2, 1, 2, 1]
    # image -> text, rank = 1 + wrong texts ahead of the best own text:
    #   i0: best own 0.9 (t0); t2 ties at 0.9                 pessimistic 2, optimistic 1
    #   i1: best own 0.8 (t3); t0 0.9 ahead, t4 ties at 0.8   3, 2
    #   i2: best own 0.6 (t4 and t5 tie: no matter); t1 0.7   2, 2
    assert image_to_text_ranks(S, T2I).tolist() == [2, 3, 2]
    assert image_to_text_ranks(S, T2I, ties="optimistic").tolist() == [1, 2, 2]


def test_hand_computed_metrics():
    got = retrieval_metrics(S, T2I, ks=(1, 2, 3))
    assert got["text_to_image"] == pytest.approx({"R@1": 100 * 2 / 6, "R@2": 100 * 4 / 6, "R@3": 100.0, "median_rank": 2.0})
    assert got["image_to_text"] == pytest.approx({"R@1": 0.0, "R@2": 100 * 2 / 3, "R@3": 100.0, "median_rank": 2.0})
    opt = retrieval_metrics(S, T2I, ks=(1, 2), ties="optimistic")
    # ranks [1,3,2,1,2,1]: median 1.5 -> floor 1 (VSE++ MedR convention)
    assert opt["text_to_image"] == pytest.approx({"R@1": 50.0, "R@2": 100 * 5 / 6, "median_rank": 1.0})
    assert opt["image_to_text"] == pytest.approx({"R@1": 100 / 3, "R@2": 100.0, "median_rank": 2.0})


def test_default_ks_and_keys():
    got = retrieval_metrics(S, T2I)
    assert set(got) == {"image_to_text", "text_to_image"}
    assert set(got["text_to_image"]) == {"R@1", "R@5", "R@10", "median_rank"}
    assert got["text_to_image"]["R@5"] == 100.0  # K beyond the number of candidates


def test_constant_scores_are_not_rewarded():
    flat = np.zeros((4, 8), dtype=np.float32)
    owners = np.repeat(np.arange(4), 2)
    pessimistic = retrieval_metrics(flat, owners, ks=(1,))
    assert pessimistic["text_to_image"] == {"R@1": 0.0, "median_rank": 4.0}
    assert pessimistic["image_to_text"] == {"R@1": 0.0, "median_rank": 7.0}  # 6 wrong texts ahead
    assert retrieval_metrics(flat, owners, ks=(1,), ties="optimistic")["text_to_image"]["R@1"] == 100.0


def reference_ranks(sim: np.ndarray, owners: np.ndarray, ties: str) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward full sort per query; ties put correct items last (pessimistic) or first."""
    n_images, n_texts = sim.shape
    correct_first = ties == "optimistic"

    def first_correct(scores: np.ndarray, is_correct: np.ndarray) -> int:
        tie_key = ~is_correct if correct_first else is_correct  # lexsort: last key is primary
        order = np.lexsort((tie_key, -scores))
        return int(np.flatnonzero(is_correct[order])[0]) + 1

    t2i = np.array([first_correct(sim[:, t], np.arange(n_images) == owners[t]) for t in range(n_texts)])
    i2t = np.array([first_correct(sim[i], owners == i) for i in range(n_images)])
    return t2i, i2t


def clip_benchmark_style_recall(sim: torch.Tensor, owners: torch.Tensor, k: int) -> tuple[float, float]:
    """CLIP_benchmark's definition: top-k by torch.topk, a hit when any positive is in it."""
    scores = sim.T  # (n_texts, n_images)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owners] = True

    def recall(s: torch.Tensor, pos: torch.Tensor) -> float:
        top = torch.topk(s, k, dim=1).indices
        hits = pos.gather(1, top).any(dim=1)
        return 100.0 * hits.float().mean().item()

    return recall(scores, positive), recall(scores.T, positive.T)  # text->image, image->text


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_matches_full_sort_reference_with_many_ties(ties):
    rng = np.random.default_rng(0)
    owners = np.concatenate([np.arange(40), rng.integers(0, 40, size=80)])  # 40 images, 120 texts
    sim = rng.integers(0, 6, size=(40, 120)).astype(np.float32)  # coarse scores: ties everywhere
    ref_t2i, ref_i2t = reference_ranks(sim, owners, ties)
    assert text_to_image_ranks(sim, owners, ties=ties).tolist() == ref_t2i.tolist()
    assert image_to_text_ranks(sim, owners, ties=ties).tolist() == ref_i2t.tolist()
    # chunking changes nothing
    tiny = dict(ties=ties, chunk_elements=7)
    assert text_to_image_ranks(sim, owners, **tiny).tolist() == ref_t2i.tolist()
    assert image_to_text_ranks(sim, owners, **tiny).tolist() == ref_i2t.tolist()


def test_matches_clip_benchmark_definition_without_ties():
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(250, 16, generator=gen), dim=-1)
    owners = torch.arange(50).repeat_interleave(5)
    sim = images @ texts.T
    got = retrieval_metrics(sim, owners, ks=(1, 5, 10), chunk_elements=1000)
    for k in (1, 5, 10):
        t2i, i2t = clip_benchmark_style_recall(sim, owners, k)
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(t2i)
        assert got["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
    ref_t2i, ref_i2t = reference_ranks(sim.numpy(), owners.numpy(), "pessimistic")
    assert got["text_to_image"]["median_rank"] == np.floor(np.median(ref_t2i))
    assert got["image_to_text"]["median_rank"] == np.floor(np.median(ref_i2t))


def test_torch_low_precision_input_equals_numpy_of_same_values():
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(30, 90, generator=gen).to(torch.bfloat16)  # bf16 rounding creates ties
    owners = torch.arange(30).repeat_interleave(3)
    assert retrieval_metrics(sim, owners) == retrieval_metrics(sim.float().numpy(), owners.numpy())
    assert retrieval_metrics(sim.half(), owners) == retrieval_metrics(sim.half().float().numpy(), owners.numpy())


def test_nested_lists_are_accepted():
    assert retrieval_metrics(S.tolist(), T2I.tolist(), ks=(1,)) == retrieval_metrics(S, T2I, ks=(1,))


@pytest.mark.parametrize(
    "sim,owners,message",
    [
        (np.zeros(6), T2I, "2-D"),
        (S, T2I[:5], "one image index per text"),
        (S, T2I.astype(float), "integer image indices"),
        (S, np.array([0, 0, 1, 1, 2, 3]), r"outside 0..2 for text\(s\) \[5\]"),
        (S, np.array([0, 0, 0, 1, 1, 1]), r"1 image\(s\) have no text.*\[2\]"),
        (np.where(S > 0.85, np.nan, S), T2I, "NaN"),
    ],
)
def test_bad_inputs(sim, owners, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sim, owners)


def test_bad_options():
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_metrics(S, T2I, ks=(0,))
    with pytest.raises(ValueError, match="ties must be one of"):
        retrieval_metrics(S, T2I, ties="random")


def test_metric_modules_do_not_import_torch_at_module_level():
    for name in ("retrieval", "vqa", "mmmu"):
        source = (Path(retrieval.__file__).parent / f"{name}.py").read_text()
        top_level = ast.parse(source).body
        imported = {
            alias.name.split(".")[0]
            for node in top_level
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        }
        assert "torch" not in imported, name
