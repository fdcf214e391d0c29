"""The compressed index type (IVF-PQ re-ranked with the exact vectors) and HNSW: chosen by size or
by name, patched incrementally, retrained when the collection outgrows its training, and the
scores they return. The kill -9 tests for IVF-PQ are in tests/test_index.py."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from multimodal_models.index import ImageIndex, vectors
from tests.test_index import COLOURS, ColourEncoder, colour_folder, write_image  # noqa: F401 (fixture)

faiss.omp_set_num_threads(1)


def clustered(n: int, dim: int, seed: int = 0, centres: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = vectors.as_unit_rows(rng.standard_normal((centres, dim)))
    return vectors.as_unit_rows(middle[rng.integers(0, centres, n)] + rng.standard_normal((n, dim)) / np.sqrt(dim))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def test_the_type_follows_the_size_unless_named():
    assert [vectors.kind_for(n, 100, "auto", 1000) for n in (10, 99, 100, 999, 1000, 10**7)] == \
        ["flat", "flat", "ivf", "ivf", "ivfpq", "ivfpq"]
    assert vectors.kind_for(10**7, 100) == "ivfpq" and vectors.kind_for(999_999, 100) == "ivf"  # default 1M
    assert vectors.kind_for(5, 100, "ivfpq") == "ivfpq" and vectors.kind_for(10**7, 100, "flat") == "flat"
    assert vectors.kind_for(10**7, 100, "hnsw") == "hnsw"
    with pytest.raises(ValueError, match="unknown index type 'pq': choose auto, flat, ivf, ivfpq, hnsw"):
        vectors.kind_for(10, 100, "pq")
    assert vectors.pq_m(512) == 64 and vectors.pq_m(48) == 6 and vectors.pq_m(100) == 10 and vectors.pq_m(4) == 1
    assert [vectors.pq_bits(n) for n in (1, 12, 255, 256, 10**6)] == [1, 3, 7, 8, 8]


def test_ivfpq_reranked_finds_the_exact_top_10_with_exact_scores_in_a_fraction_of_the_memory():
    n, dim = 6000, 128
    data = clustered(n, dim)
    ids = np.arange(1000, 1000 + n)  # file ids, not positions
    queries = clustered(40, dim, seed=1)
    exact = vectors.build(ids, data, dim, approximate_threshold=n + 1)
    pq = vectors.build(ids, data, dim, approximate_threshold=1, index_type="ivfpq")
    assert vectors.kind_of(pq) == "ivfpq" and vectors.kind_of(exact) == "flat"
    ivf = vectors.ivf_of(pq)
    assert (ivf.pq.M, ivf.pq.nbits, ivf.nlist) == (16, 8, vectors.ivf_lists(n))
    flat_bytes = len(faiss.serialize_index(exact)) / n
    pq_bytes = len(faiss.serialize_index(pq)) / n
    assert flat_bytes > 4 * pq_bytes  # 520 bytes (float32 + id) against ~16 + 8 + centroids and codebooks

    truth_scores, truth = vectors.search(exact, queries, 10)
    fetch_calls = []

    def fetch(wanted):
        fetch_calls.append(len(wanted))
        return data[np.asarray(wanted) - 1000]

    scores, found = vectors.search(pq, queries, 10, nprobe=ivf.nlist, refine=20, fetch=fetch)
    assert fetch_calls and max(fetch_calls) <= 40 * 200  # one fetch per call, of the distinct candidates
    assert recall(found, truth) >= 0.95
    # the scores are the exact cosines of the ids returned, best first
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, data[found - 1000]), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    # without re-ranking: the codes' approximate scores, and fewer of the true neighbours
    approx_scores, approx = vectors.search(pq, queries, 10, nprobe=ivf.nlist)
    assert recall(approx, truth) < recall(found, truth)
    assert not np.allclose(approx_scores, np.einsum("qd,qkd->qk", queries, data[approx - 1000]), atol=1e-5)


def test_ivfpq_is_patched_in_place_and_retrained_when_the_collection_outgrows_it():
    dim = 32
    data = clustered(4000, dim)
    ids = np.arange(4000)
    small = vectors.build(ids[:100], data[:100], dim, approximate_threshold=1, index_type="ivfpq")
    assert vectors.ivf_of(small).pq.nbits == 6  # 100 points cannot train 256 centroids per sub-quantizer
    assert not vectors.needs_rebuild(small, 100, 1, "ivfpq")
    assert vectors.needs_rebuild(small, 300, 1, "ivfpq")  # now 8-bit codes can be trained
    index = vectors.build(ids[:1000], data[:1000], dim, approximate_threshold=1, index_type="ivfpq")
    vectors.remove(index, ids[:200])
    vectors.add(index, ids[1000:1500], data[1000:1500])
    assert index.ntotal == 1300 and sorted(vectors.stored_ids(index)) == list(range(200, 1500))
    assert not vectors.needs_rebuild(index, 1300, 1, "ivfpq")
    assert vectors.needs_rebuild(index, 4000, 1, "ivfpq")  # 4x the collection its lists were trained for
    assert vectors.needs_rebuild(index, 1300, 1, "ivf")  # another type named
    # what was added is found with its exact score
    scores, found = vectors.search(index, data[1200:1201], 1, refine=5, fetch=lambda w: data[np.asarray(w)])
    assert found[0, 0] == 1200 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_hnsw_cannot_remove_so_it_is_rebuilt():
    dim = 16
    data = clustered(300, dim)
    index = vectors.build(np.arange(300), data, dim, approximate_threshold=10**9, index_type="hnsw")
    assert vectors.kind_of(index) == "hnsw" and not vectors.can_remove(index)
    with pytest.raises(RuntimeError, match="cannot remove vectors from an HNSW index"):
        vectors.remove(index, [1])
    _, found = vectors.search(index, data[:20], 1)
    assert list(found[:, 0]) == list(range(20))
    assert sorted(vectors.stored_ids(index)) == list(range(300))


@pytest.mark.parametrize("index_type", ["ivfpq", "hnsw"])
def test_an_image_index_of_a_named_type_updates_incrementally(colour_folder, tmp_path, index_type):  # noqa: F811
    encoder = ColourEncoder()
    with ImageIndex.open(tmp_path / "idx", create=True, refine=4) as index:
        report = index.update(colour_folder, encoder, batch_size=2, index_type=index_type, progress=False)
        assert report.kind == index_type and index.info["index_type"] == index_type
        entries = {e.path: e for e in index.entries()}
        for entry in entries.values():  # each image finds itself first, with its exact cosine
            hit = index.search_vector(entry.vector, k=3)[0]
            assert hit.path == entry.path and hit.score == pytest.approx(1.0, abs=1e-5)
        for name in COLOURS:
            hits = index.search_text(encoder, f"a {name}", k=len(COLOURS))
            cosines = sorted((float(e.vector @ encoder.embed_texts([f"a {name}"])[0] / np.linalg.norm(
                encoder.embed_texts([f"a {name}"])[0])) for e in entries.values()), reverse=True)
            np.testing.assert_allclose([h.score for h in hits], cosines, atol=1e-5)  # exact scores, all found

        write_image(colour_folder / "new/orange.png", (240, 140, 20), seed=50)
        (colour_folder / "red.png").unlink()
        report = index.update(colour_folder, encoder, progress=False)  # patched (HNSW: rebuilt), same type kept
        assert (report.added, report.removed, report.embedded, report.kind) == (1, 1, 1, index_type)
        assert index.verify() == {"files": len(COLOURS), "generation": 2, "staged": 0, "kind": index_type}
        assert index.search_image(encoder, colour_folder / "new/orange.png", k=1)[0].path == "new/orange.png"

        report = index.update(colour_folder, encoder, index_type="flat", progress=False)  # another type: rebuilt
        assert report.kind == "flat" and report.generation == 2 and index.verify()["kind"] == "flat"
        report = index.update(colour_folder, encoder, index_type="auto", approximate_threshold=1,
                              compressed_threshold=5, progress=False)
        assert report.kind == "ivfpq"  # 6 images >= 5
        with pytest.raises(ValueError, match="unknown index type"):
            index.update(colour_folder, encoder, index_type="annoy", progress=False)
    with ImageIndex.open(tmp_path / "idx") as index:  # reopened: the kept settings, the same search
        assert index.info["compressed_threshold"] == 5 and index.verify()["kind"] == "ivfpq"
        assert index.search_image(encoder, colour_folder / "blue.png", k=1)[0].path == "blue.png"
