"""The FAISS side of the image index: exact search for small collections, IVF above a threshold,
IVF-PQ (compressed, re-ranked) for millions.

Every index maps FAISS ids to `files.id` in the SQLite store, so rows can be added and
removed without renumbering:

- `flat`: `IDMap,Flat` with inner product. Exact; a query costs one pass over all vectors.
- `ivf`:  `IVF{nlist},Flat` with inner product and spherical k-means centroids. A query
  compares against the `nlist` centroids, then scans the `nprobe` nearest lists only.
  Vectors are stored uncompressed, so the scores it returns are exact cosines; only the
  candidate set is approximate. It supports `add_with_ids` / `remove_ids`, which lets an
  incremental update patch the previous index instead of rebuilding it (HNSW cannot
  remove vectors). `nlist` follows the collection size; when the size has drifted by more
  than 2x from what the lists were trained for, the index is rebuilt.

Why IVF rather than HNSW, measured here (100k uniform random unit vectors, dim 256, one
thread): HNSW (M=32, efConstruction=80) took 44 s to build and found 35% of the true top
10 at efSearch=128 (0.54 ms/query); IVF316 took 0.8 s to build and finds 46% at nprobe=64
(0.64 ms) and 71% at nprobe=128 (1.3 ms). On clustered data (closer to real embeddings)
IVF finds 99% at nprobe=32. Similar speed/recall, 50x cheaper to build, and patchable.

- `ivfpq`: `IVF{nlist},PQ{m}` (m = dim / 8 one-byte codes: 64 bytes for 512 dims, ~80 bytes per
  vector with its id and the lists), for millions of images. The codes give approximate scores, so
  a query asks FAISS for `k x refine` candidates and re-ranks that shortlist with `fetch`
  (the image index: its float16 file, `halfvectors.py`; SQLite when that is missing), then scores
  the final k with `final` (the exact float32 vectors from SQLite): the scores returned are exact
  cosines again. Patched like `ivf` (`add_with_ids` / `remove_ids`); retrained on the same 2x
  drift of `nlist` (4x in count) and when the codes were trained on fewer than 256 points.
  Why not OPQ: on 28.8k x 512 its training took 376 s against 23 s, and IVF-PQ with re-ranking
  already reaches recall@10 1.0 on clustered data (benchmarks/index_search.py, docs/index-at-scale.md).
- `hnsw`: `IDMap,HNSW32,Flat`, by flag only: fast queries without training, but it holds the
  float32 vectors plus the graph (~2.3 KB per 512-d vector), builds slowly, and FAISS cannot remove
  from it, so an update that removes or changes a file rebuilds it.

The type follows the collection's size (`kind_for`: flat below `approximate_threshold`, ivf up
to `compressed_threshold`, ivfpq from there) unless an index type is named.

Vectors are unit float32 rows, so inner product = cosine similarity.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

# faiss-cpu 1.15 raised `distance_compute_blas_threshold` to 128000, so a batch of queries
# against a flat index is scanned query by query with SIMD code instead of one BLAS
# matrix product: ~8x slower at 256 queries on these machines. One or two queries are
# faster without BLAS, so from this many queries up use BLAS. (A process-wide setting.)
BLAS_THRESHOLD = 4
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

# Below this many vectors search is exact (flat); from here up it is IVF. Exact search of
# 100k x 256 takes ~9 ms per query on one core (~0.5 ms per query in batches), past which
# IVF's 20-40x is worth its approximation (benchmarks/index_search.py).
DEFAULT_APPROXIMATE_THRESHOLD = 100_000
# Inverted lists scanned per query (IVF only). See benchmarks/index_search.py for recall.
DEFAULT_NPROBE = 32
# From this many vectors up the automatic type is IVF-PQ: IVF-Flat holds 2 KB per 512-d vector
# (2 GB per million), IVF-PQ ~80 bytes (benchmarks/index_search.py).
DEFAULT_COMPRESSED_THRESHOLD = 1_000_000
# IVF-PQ: FAISS returns k * refine candidates by their codes, re-ranked with the exact vectors.
# At 1M x 512 clustered (1000 vectors per blob, so the top 10 differ by little), 64-byte codes alone
# find 26% of the true top 10; re-ranking 10 x 10 / 20 / 40 candidates finds 77 / 91 / 98%
# (docs/index-at-scale.md).
DEFAULT_REFINE = 40
# HNSW: neighbours per node, and the search breadth (at least k).
HNSW_M = 32
DEFAULT_EF_SEARCH = 128
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
# Training points per IVF list (faiss warns under 39; more makes k-means slower, not much better).
TRAIN_POINTS_PER_LIST = 64
# Training points of the PQ codes at least (256 centroids per sub-quantizer: 64 points each).
PQ_TRAIN_POINTS = 16_384


def as_unit_rows(vectors, dim: int | None = None, *, what: str = "vectors") -> np.ndarray:
    """Any (N, E) array-like (numpy, torch, lists) -> C-contiguous float32 unit rows.

    Raises ValueError on a wrong shape, a dimension other than `dim`, non-finite or zero rows.
    """
    if hasattr(vectors, "detach"):  # a torch tensor, without importing torch here
        vectors = vectors.detach().float().cpu().numpy()
    array = np.array(vectors, dtype=np.float32, copy=True)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{what} must be a (N, E) array, got shape {tuple(array.shape)}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have dimension {array.shape[1]}, the index holds dimension {dim}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{what} contain an all-zero row, which has no direction")
    return np.ascontiguousarray(array / norms[:, None], dtype=np.float32)


def ivf_lists(count: int) -> int:
    """The number of IVF lists for `count` vectors: about sqrt(count), at least 1, and
    few enough that every list gets TRAIN_POINTS_PER_LIST / 2 training points."""
    return max(1, min(int(round(math.sqrt(count))), count // (TRAIN_POINTS_PER_LIST // 2)))


def ivf_of(index: faiss.Index):
    """The IVF part of `index` as its own class (IndexIVFFlat, IndexIVFPQ), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def pq_m(dim: int) -> int:
    """Sub-quantizers of IVF-PQ: one byte per 8 dimensions (64 for 512-d), a divisor of `dim`."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def pq_bits(count: int) -> int:
    """Bits per PQ code: 8 (256 centroids per sub-quantizer), fewer for a collection too small to train them."""
    return max(1, min(8, int(math.log2(max(count, 2)))))


def check_type(index_type: str) -> str:
    if index_type not in ("auto", *INDEX_TYPES):
        raise ValueError(f"unknown index type {index_type!r}: choose auto, " + ", ".join(INDEX_TYPES))
    return index_type


def kind_for(count: int, approximate_threshold: int, index_type: str = "auto",
             compressed_threshold: int = DEFAULT_COMPRESSED_THRESHOLD) -> str:
    """The index type for `count` vectors: `index_type` when named, else by size."""
    if check_type(index_type) != "auto":
        return index_type
    if count >= max(compressed_threshold, approximate_threshold):
        return "ivfpq"
    return "ivf" if count >= approximate_threshold else "flat"


def kind_of(index: faiss.Index) -> str:
    ivf = ivf_of(index)
    if ivf is not None:
        return "ivfpq" if isinstance(ivf, faiss.IndexIVFPQ) else "ivf"
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"


def needs_rebuild(index: faiss.Index, count: int, approximate_threshold: int, index_type: str = "auto",
                  compressed_threshold: int = DEFAULT_COMPRESSED_THRESHOLD) -> bool:
    """True when `index` (about to hold `count` vectors) should be rebuilt rather than patched:
    the type changes (across a threshold, or another type named), the IVF lists were sized for a
    collection more than 2x smaller or larger (4x in count: the quantizer was trained on another
    collection), or the PQ codes were trained with fewer bits than this many vectors allow."""
    if kind_of(index) != kind_for(count, approximate_threshold, index_type, compressed_threshold):
        return True
    ivf = ivf_of(index)
    if ivf is None:
        return False
    ideal = ivf_lists(count)
    if not (ideal / 2 <= ivf.nlist <= ideal * 2):
        return True
    return isinstance(ivf, faiss.IndexIVFPQ) and ivf.pq.nbits < pq_bits(count)


def training_sample(vectors: np.ndarray, most: int) -> np.ndarray:
    """At most `most` rows, the same for the same collection."""
    if len(vectors) <= most:
        return vectors
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), most, replace=False))
    return vectors[rows]


def build(ids: np.ndarray, vectors: np.ndarray, dim: int, approximate_threshold: int, index_type: str = "auto",
          compressed_threshold: int = DEFAULT_COMPRESSED_THRESHOLD) -> faiss.Index:
    """A new index over (ids[i], vectors[i]), of the type `kind_for` gives."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    kind = kind_for(len(ids), approximate_threshold, index_type, compressed_threshold)
    if kind == "flat":
        index = faiss.index_factory(dim, "IDMap,Flat", faiss.METRIC_INNER_PRODUCT)
    elif kind == "hnsw":
        index = faiss.index_factory(dim, f"IDMap,HNSW{HNSW_M},Flat", faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = ivf_lists(len(ids))
        if kind == "ivf":
            index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            most = nlist * TRAIN_POINTS_PER_LIST
        else:  # np: no polysemous training (it took 15x longer than the rest of the training)
            index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m(dim)}x{pq_bits(len(ids))}np",
                                        faiss.METRIC_INNER_PRODUCT)
            most = max(nlist * TRAIN_POINTS_PER_LIST, PQ_TRAIN_POINTS)
        ivf = ivf_of(index)
        ivf.cp.spherical = True  # centroids on the unit sphere, like the data
        ivf.cp.seed = 1234  # the same collection gives the same lists
        ivf.cp.min_points_per_centroid = 1  # ivf_lists() sizes the lists; no warning for tiny collections
        if kind == "ivfpq":
            ivf.pq.cp.seed = 1234
            ivf.pq.cp.min_points_per_centroid = 1
        index.train(training_sample(vectors, most))
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def add(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def can_remove(index: faiss.Index) -> bool:
    return kind_of(index) != "hnsw"


def remove(index: faiss.Index, ids) -> int:
    """Remove `ids`; an HNSW index cannot (RuntimeError: rebuild it instead)."""
    ids = np.ascontiguousarray(np.fromiter(ids, dtype=np.int64))
    if not len(ids):
        return 0
    if not can_remove(index):
        raise RuntimeError("FAISS cannot remove vectors from an HNSW index")
    return int(index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))


def stored_ids(index: faiss.Index) -> np.ndarray:
    """All ids held by an index of any of the types (unordered), for consistency checks."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
    invlists = ivf.invlists
    parts = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def search(index: faiss.Index, queries: np.ndarray, k: int, *, nprobe: int = DEFAULT_NPROBE,
           refine: int = DEFAULT_REFINE, fetch=None, ef_search: int = DEFAULT_EF_SEARCH, final=None
           ) -> tuple[np.ndarray, np.ndarray]:
    """queries (Q, E) unit rows -> scores (Q, k), ids (Q, k); id -1 (score -inf) pads when fewer than k exist.

    IVF-PQ: `fetch(ids) -> (len(ids), E)` float32 exact vectors re-ranks the best `k * refine`
    candidates by their codes (`rerank`), so the scores are exact cosines; without `fetch`
    the scores are the codes' approximations. `final(ids)`, when given, re-scores the k kept with
    other vectors (the image index: float16 `fetch` for the shortlist, exact float32 for the final k)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(int(k), max(index.ntotal, 1)))
    kind = kind_of(index)
    if kind == "flat":
        return index.search(queries, k)
    if kind == "hnsw":
        return index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=max(int(ef_search), k)))
    params = faiss.SearchParametersIVF(nprobe=max(1, int(nprobe)))
    if kind == "ivf" or fetch is None:
        return index.search(queries, k, params=params)
    shortlist = max(k, min(k * max(1, int(refine)), index.ntotal))
    _, candidates = index.search(queries, shortlist, params=params)
    scores, ids = rerank(queries, candidates, k, fetch)
    return rerank(queries, ids, k, final) if final is not None else (scores, ids)


def rerank(queries: np.ndarray, candidates: np.ndarray, k: int, fetch) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidate ids (Q, C; -1 ignored) with the vectors `fetch(ids)`
    returns (one call for all queries' distinct ids), best k first: scores (Q, k), ids (Q, k)."""
    wanted = np.unique(candidates[candidates >= 0])
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    if not len(wanted):
        return scores, ids
    stored = np.asarray(fetch(wanted), dtype=np.float32).reshape(len(wanted), -1)
    # few queries: one product for all (no per-query copy of the vectors); many: per query (memory)
    every = stored @ queries.T if len(queries) <= 8 else None
    for row, found in enumerate(candidates):
        found = found[found >= 0]
        positions = np.searchsorted(wanted, found)
        exact = every[positions, row] if every is not None else stored[positions] @ queries[row]
        best = np.argsort(-exact, kind="stable")[:k]
        scores[row, : len(best)], ids[row, : len(best)] = exact[best], found[best]
    return scores, ids


def merge(results, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard results [(scores (Q, k_i), ids (Q, k_i)), ...] into the best k over all:
    scores (Q, k), ids (Q, k), and which shard each came from (Q, k); -1 pads. Ties keep
    shard order. This is what one index over all the shards' vectors returns for exact search:
    every true top-k vector is in its own shard's top k."""
    results = list(results)
    if not results:
        raise ValueError("no shards to merge")
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in results], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in results], axis=1)
    shard = np.concatenate([np.full(np.shape(i), n, dtype=np.int64) for n, (_, i) in enumerate(results)], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)
    out_scores, out_ids, out_shard = take(scores), take(ids), take(shard)
    missing = out_ids < 0
    out_shard[missing] = -1
    if out_ids.shape[1] < k:  # fewer than k candidates in all: pad
        pad = k - out_ids.shape[1]
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_shard = np.pad(out_shard, ((0, 0), (0, pad)), constant_values=-1)
    return out_scores, out_ids, out_shard


def search_shards(indexes, queries: np.ndarray, k: int, *, fetches=None, **options
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search several indexes (shards of one collection: ids unique within each) and merge their
    top k: scores (Q, k), ids (Q, k), shard numbers (Q, k). `fetches[i]` re-ranks shard i
    (IVF-PQ). In one process the shards are searched one after the other; across machines,
    each searches its own shard and `merge` combines what they return."""
    fetches = list(fetches) if fetches is not None else [None] * len(indexes)
    return merge((search(index, queries, k, fetch=fetch, **options) for index, fetch in zip(indexes, fetches)), k)


def write_atomic(index: faiss.Index, path: Path, *, before_replace=None) -> None:
    """Write `index` to `path` atomically (replace_atomically)."""
    replace_atomically(path, lambda tmp: faiss.write_index(index, tmp), before_replace=before_replace)


def replace_atomically(path: Path, fill, *, before_replace=None) -> None:
    """Give `path` new content so that it holds either its old content or all of the new:
    `fill(tmp)` writes a temporary file in the same folder, which is fsynced, then renamed over
    `path`, then the folder fsynced so the rename itself survives a power cut. `before_replace`
    is a hook for the crash tests."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
