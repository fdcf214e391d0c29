"""Sharded search: a collection split into shards, each searched for its own top k and the results
merged, returns what one index over all the vectors returns (exactly, for exact search; nearly,
for the approximate types, whose shards each train their own lists)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from multimodal_models.errors import MultimodalError
from multimodal_models.index import ImageIndex, vectors
from multimodal_models.index.image_index import ShardedIndex
from tests.test_index import COLOURS, PATHS, ColourEncoder, colour_folder, write_image  # noqa: F401 (fixture)
from tests.test_index_compressed import clustered, recall

faiss.omp_set_num_threads(1)


def split(ids: np.ndarray, shards: int) -> list[np.ndarray]:
    """Positions of each shard's rows: by id, as a collection spread over machines would be."""
    return [np.flatnonzero(ids % shards == s) for s in range(shards)]


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_sharded_exact_search_returns_the_same_top_k_ids_and_scores_as_one_index(shards):
    rng = np.random.default_rng(shards)
    n, dim = 3000, 48
    data = vectors.as_unit_rows(rng.standard_normal((n, dim)))
    ids = rng.permutation(np.arange(10_000, 10_000 + n))
    queries = vectors.as_unit_rows(rng.standard_normal((60, dim)))
    one = vectors.build(ids, data, dim, approximate_threshold=n + 1)
    parts = [vectors.build(ids[rows], data[rows], dim, approximate_threshold=n + 1) for rows in split(ids, shards)]
    for k in (1, 10, 100):
        scores, found = vectors.search(one, queries, k)
        merged_scores, merged, shard = vectors.search_shards(parts, queries, k)
        np.testing.assert_array_equal(merged, found)
        np.testing.assert_allclose(merged_scores, scores, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(shard, merged % shards)  # each hit says which shard holds it
    # k beyond a shard's size, and beyond the whole collection: everything, then -1 padding
    small = [vectors.build(ids[rows][:3], data[rows][:3], dim, approximate_threshold=10) for rows in split(ids, shards)]
    scores, found, shard = vectors.search_shards(small, queries[:2], 3 * shards + 2)
    assert (found[:, : 3 * shards] >= 0).all() and (found[:, 3 * shards :] == -1).all()
    assert (shard[:, 3 * shards :] == -1).all() and np.isneginf(scores[:, 3 * shards :]).all()
    assert (np.diff(scores[:, : 3 * shards], axis=1) <= 0).all()


def test_merge_of_results_from_other_processes_and_faiss_index_shards_agree():
    """`merge` takes what each machine returned; FAISS's own IndexShards (one process, threads)
    gives the same answer over the same shards."""
    rng = np.random.default_rng(7)
    n, dim = 2000, 32
    data = vectors.as_unit_rows(rng.standard_normal((n, dim)))
    ids = np.arange(n)
    queries = vectors.as_unit_rows(rng.standard_normal((20, dim)))
    parts = [vectors.build(ids[rows], data[rows], dim, approximate_threshold=n + 1) for rows in split(ids, 4)]
    returned = [p.search(queries, 10) for p in parts]  # e.g. over HTTP, one per machine
    scores, found, _ = vectors.merge(returned, 10)
    together = faiss.IndexShards(dim, False, False)  # threaded=False, successive_ids=False: the shards' own ids
    for p in parts:
        together.add_shard(p)
    faiss_scores, faiss_found = together.search(queries, 10)
    np.testing.assert_array_equal(found, faiss_found)
    np.testing.assert_allclose(scores, faiss_scores, atol=1e-6)
    with pytest.raises(ValueError, match="no shards"):
        vectors.merge([], 10)


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq", "hnsw"])
def test_sharded_approximate_search_is_near_one_index(index_type):
    n, dim = 8000, 64
    data = clustered(n, dim, seed=3)
    ids = np.arange(n)
    queries = clustered(50, dim, seed=4)
    _, truth = vectors.search(vectors.build(ids, data, dim, approximate_threshold=n + 1), queries, 10)
    one = vectors.build(ids, data, dim, approximate_threshold=1, index_type=index_type)
    parts = [vectors.build(ids[rows], data[rows], dim, approximate_threshold=1, index_type=index_type)
             for rows in split(ids, 2)]
    fetch = lambda wanted: data[np.asarray(wanted)]  # noqa: E731 (ids are positions here)
    options = {"nprobe": 16, "refine": 20}
    _, alone = vectors.search(one, queries, 10, fetch=fetch, **options)
    scores, merged, _ = vectors.search_shards(parts, queries, 10, fetches=[fetch, fetch], **options)
    # each shard searches half the vectors as widely as the one index searches all: as good or better
    assert recall(merged, truth) >= recall(alone, truth) - 0.02 and recall(merged, truth) >= 0.95
    # and nearly the same hits (HNSW alone finds 87% of the true top 10 here; its shards, 98%)
    assert recall(merged, alone) >= (0.95 if index_type != "hnsw" else 0.85)
    # the scores are the exact cosines of the ids returned (IVF-PQ: re-ranked)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, data[merged]), atol=1e-5)


def test_sharded_image_indexes_search_like_one_index_over_the_whole_folder(colour_folder, tmp_path):  # noqa: F811
    encoder = ColourEncoder()
    for i in range(6):  # more images, so the ranking below the top matters
        write_image(colour_folder / f"more/{i}.png", (40 * i, 90, 160), seed=300 + i)
    whole = ImageIndex.open(tmp_path / "whole", create=True)
    whole.update(colour_folder, encoder, progress=False)
    # the same images split into two folders, each indexed on its own (as two machines would)
    halves = [tmp_path / "half-a", tmp_path / "half-b"]
    for entry in whole.entries():
        target = halves[hash(entry.path) % 2 if entry.path not in ("red.png", "blue.png") else
                        ("red.png", "blue.png").index(entry.path)] / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(colour_folder / entry.path, target)
    for half in halves:
        with ImageIndex.open(half / ".multimodal-index", create=True) as index:
            index.update(half, encoder, progress=False)
    with ShardedIndex.open(halves) as sharded:
        assert len(sharded) == len(whole) == len(COLOURS) + 6
        for name in COLOURS:
            expected = whole.search_text(encoder, f"a {name}", k=8)
            got = sharded.search(encoder, text=f"a {name}", k=8)
            assert [h.path for h in expected] == [hit.path for _, hit in got]
            np.testing.assert_allclose([h.score for h in expected], [hit.score for _, hit in got], atol=1e-6)
            for shard, hit in got:  # each hit's path is relative to its own shard's folder
                assert (sharded.shards[shard].root / hit.path).is_file()
        got = sharded.search_vector(next(whole.entries()).vector, k=100)
        assert len(got) == len(whole)
    whole.close()
    # shards of different models cannot be searched together
    other = tmp_path / "other"
    write_image(other / "x.png", (1, 2, 3), seed=1)
    with ImageIndex.open(other / ".multimodal-index", create=True) as index:
        index.update(other, ColourEncoder("colour-v2"), progress=False)
    with pytest.raises(MultimodalError, match="different models"):
        ShardedIndex.open([halves[0], other])
    assert PATHS  # (the fixture's layout)


def test_cli_search_with_shards_equals_one_index(tmp_path, capsys):
    import torch

    from multimodal_models.cli import main
    from tests.test_dual_encoder import random_images, tiny_model

    torch.set_num_threads(1)
    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    whole = tmp_path / "whole"
    for i, image in enumerate(random_images(6, seed=5)):
        for folder in (whole / ("a" if i % 2 else "b"), tmp_path / ("a" if i % 2 else "b")):
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    for folder in (whole, tmp_path / "a", tmp_path / "b"):
        assert main(["index", str(folder), "--model", str(model_dir), "--quiet", "--index-type", "flat"]) == 0
        assert json.loads(capsys.readouterr().out)["kind"] == "flat"

    def search(index, *options) -> list[tuple[str, float]]:
        assert main(["search", index, "a red circle", "-k", "4", "--json", *options]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        return [(Path(line["file"]).name, line["score"]) for line in lines]

    one = search(str(whole))
    sharded = search(str(tmp_path / "a"), "--shard", str(tmp_path / "b"))
    assert [name for name, _ in sharded] == [name for name, _ in one] and len(one) == 4
    np.testing.assert_allclose([s for _, s in sharded], [s for _, s in one], atol=1e-5)
