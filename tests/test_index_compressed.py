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


# --- the float16 re-ranking file ---------------------------------------------------------------------


class TableEncoder:
    """Image -> row n of a table of clustered vectors, n written in its first pixel (R * 256 + G)."""

    def __init__(self, table: np.ndarray):
        self.table, self.fingerprint = table, "table-v1"

    def embed_images(self, images):
        return np.stack([self.table[256 * im.getpixel((0, 0))[0] + im.getpixel((0, 0))[1]] for im in images])


def numbered_folder(folder, numbers) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        Image.new("RGB", (2, 2), (n // 256, n % 256, 0)).save(folder / f"{n:05d}.png")


def search_both_ways(index: ImageIndex, queries: np.ndarray, k: int = 10):
    """(hits re-ranked with the float16 file, hits re-ranked from SQLite alone), same snapshot of the index."""
    with_file = index.search_vectors(queries, k)
    assert index._half is not None
    current = index._current_half
    index._current_half = lambda _: None  # what a search without the file does
    try:
        from_sqlite = index.search_vectors(queries, k)
    finally:
        index._current_half = current
    return with_file, from_sqlite


@pytest.fixture(scope="module")
def table():
    return clustered(1700, 64, seed=3, centres=20)


@pytest.fixture
def numbered_index(tmp_path, table):
    folder = tmp_path / "images"
    numbered_folder(folder, range(1500))
    index = ImageIndex.open(tmp_path / "idx", create=True, refine=10)
    index.update(folder, TableEncoder(table), batch_size=500, index_type="ivfpq", progress=False)
    yield index, folder
    index.close()


def test_the_float16_file_gives_the_ids_and_scores_of_sqlite_re_ranking(numbered_index, table):
    from multimodal_models.index import halfvectors

    index, _ = numbered_index
    path = index.path / "rerank-00000001.f16"
    assert path.stat().st_size == halfvectors.expected_size(64, 1500)  # 64 B header + ids + 1500 x 64 float16
    queries = clustered(40, 64, seed=4, centres=20)
    with_file, from_sqlite = search_both_ways(index, queries)
    assert isinstance(index._half.vectors, np.memmap) and index._half.vectors.mode == "r"
    assert [[h.id for h in hits] for hits in with_file] == [[h.id for h in hits] for hits in from_sqlite]
    # the final k are scored with the exact float32 vectors: the same scores as SQLite re-ranking
    np.testing.assert_allclose([[h.score for h in hits] for hits in with_file],
                               [[h.score for h in hits] for hits in from_sqlite], atol=1e-6)
    # float16 alone (the shortlist's re-ranking) is within 1e-3 of the exact cosines
    ids = np.array([h.id for hits in with_file for h in hits])
    half_scores = np.einsum("qkd,qd->qk", index._half.fetch(np.sort(ids))[np.argsort(np.argsort(ids))].reshape(
        40, 10, 64), queries)
    np.testing.assert_allclose(half_scores, [[h.score for h in hits] for hits in with_file], atol=1e-3)


def test_an_update_patches_the_float16_file_into_the_next_generation_without_reading_sqlite(
        numbered_index, table, monkeypatch):
    from multimodal_models.index import store

    index, folder = numbered_index
    reader = ImageIndex.open(index.path)  # a reader of generation 1, searching before the update
    old_hits = reader.search_vectors(table[:5], 3)
    old_half = reader._half
    for n in range(5):
        (folder / f"{n:05d}.png").unlink()  # removed
    numbered_folder(folder, range(1500, 1700))  # added
    (folder / "00010.png").unlink()
    from PIL import Image
    Image.new("RGB", (2, 2), (1600 // 256, 1600 % 256, 0)).save(folder / "00010.png")  # changed: now row 1600
    real_all_vectors = store.all_vectors
    monkeypatch.setattr(store, "all_vectors", lambda *a: pytest.fail("the float16 file was rebuilt from SQLite"))
    report = index.update(folder, TableEncoder(table), batch_size=500, progress=False)
    monkeypatch.setattr(store, "all_vectors", real_all_vectors)
    assert (report.added, report.removed, report.changed, report.generation) == (200, 5, 1, 2)
    names = sorted(p.name for p in index.path.iterdir() if p.name.endswith((".f16", ".faiss", ".tmp")))
    assert names == ["rerank-00000002.f16", "vectors-00000002.faiss"]  # the old generation's files deleted

    # the new file holds exactly SQLite's vectors, in float16
    with_file, from_sqlite = search_both_ways(index, table[[5, 10, 1500, 1600, 1699]])
    assert [[h.id for h in hits] for hits in with_file] == [[h.id for h in hits] for hits in from_sqlite]
    assert index._half_generation == 2
    ids, vectors = real_all_vectors(index._conn, 64)
    assert np.array_equal(index._half.ids, ids)
    np.testing.assert_allclose(index._half.vectors, vectors, atol=1e-3)
    changed_id = index._conn.execute("SELECT id FROM files WHERE path = '00010.png'").fetchone()[0]
    np.testing.assert_allclose(index._half.fetch([changed_id])[0], table[1600], atol=1e-3)
    # the reader's generation-1 file was not touched by the update (its mapping outlives the deletion)
    np.testing.assert_allclose(old_half.fetch([changed_id])[0], table[10], atol=1e-3)
    assert old_half.generation == 1 and old_hits[0][0].path == "00000.png"
    new_hit = reader.search_vectors(table[:1], 1)[0][0]  # its next search: a new snapshot, generation 2's file
    assert reader._half_generation == 2 and new_hit.path != "00000.png"
    reader.close()


def test_a_missing_stale_or_truncated_float16_file_is_rebuilt_and_an_unwritable_one_falls_back(
        numbered_index, table, monkeypatch):
    from multimodal_models.index import halfvectors

    index, _ = numbered_index
    path = index.path / "rerank-00000001.f16"
    queries = table[[0, 100, 700]]
    expected = [[h.id for h in hits] for hits in ImageIndex.open(index.path).search_vectors(queries, 10)]
    good = path.read_bytes()

    def fresh_search():
        with ImageIndex.open(index.path, refine=10) as reader:
            hits = reader.search_vectors(queries, 10)
            return [[h.id for h in row] for row in hits], reader._half

    path.write_bytes(good[: len(good) - 100])  # truncated
    ids, half = fresh_search()
    assert ids == expected and half is not None and path.read_bytes() == good  # detected, rebuilt the same
    stale = bytearray(good)
    stale[8:16] = (7).to_bytes(8, "little")  # another generation's header
    path.write_bytes(bytes(stale))
    assert fresh_search()[0] == expected and path.read_bytes() == good
    wrong_ids = bytearray(good)
    wrong_ids[64:72] = (99_999).to_bytes(8, "little")  # the right header, not these files' ids
    path.write_bytes(bytes(wrong_ids))
    assert fresh_search()[0] == expected and path.read_bytes() == good
    path.unlink()  # missing
    assert fresh_search()[0] == expected and path.read_bytes() == good

    path.unlink()  # missing, and the folder cannot be written: SQLite re-ranks
    monkeypatch.setattr(halfvectors, "write_arrays", lambda *a, **k: (_ for _ in ()).throw(PermissionError("ro")))
    ids, half = fresh_search()
    assert ids == expected and half is None and not path.exists()
