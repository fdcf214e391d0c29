"""The FAISS side of the image index: exact search for small collections, IVF above a threshold.

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
# Training points per IVF list (faiss warns under 39; more makes k-means slower, not much better).
TRAIN_POINTS_PER_LIST = 64


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


def kind_for(count: int, approximate_threshold: int) -> str:
    return "ivf" if count >= approximate_threshold else "flat"


def kind_of(index: faiss.Index) -> str:
    return "ivf" if faiss.try_extract_index_ivf(index) is not None else "flat"


def needs_rebuild(index: faiss.Index, count: int, approximate_threshold: int) -> bool:
    """True when `index` (about to hold `count` vectors) should be rebuilt rather than patched:
    the kind changes across the threshold, or the IVF lists were sized for a collection
    more than 2x smaller or larger."""
    if kind_of(index) != kind_for(count, approximate_threshold):
        return True
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return False
    ideal = ivf_lists(count)
    return not (ideal / 2 <= ivf.nlist <= ideal * 2)


def build(ids: np.ndarray, vectors: np.ndarray, dim: int, approximate_threshold: int) -> faiss.Index:
    """A new index over (ids[i], vectors[i]); IVF when there are at least `approximate_threshold` rows."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    if kind_for(len(ids), approximate_threshold) == "flat":
        index = faiss.index_factory(dim, "IDMap,Flat", faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = ivf_lists(len(ids))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True  # centroids on the unit sphere, like the data
        ivf.cp.seed = 1234  # the same collection gives the same lists
        ivf.cp.min_points_per_centroid = 1  # ivf_lists() sizes the lists; no warning for tiny collections
        sample = vectors
        most = nlist * TRAIN_POINTS_PER_LIST
        if len(vectors) > most:
            rows = np.sort(np.random.default_rng(0).choice(len(vectors), most, replace=False))
            sample = vectors[rows]
        index.train(sample)
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def add(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def remove(index: faiss.Index, ids) -> int:
    ids = np.ascontiguousarray(np.fromiter(ids, dtype=np.int64))
    if not len(ids):
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))


def stored_ids(index: faiss.Index) -> np.ndarray:
    """All ids held by a flat or IVF index (unordered), for consistency checks."""
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


def search(index: faiss.Index, queries: np.ndarray, k: int, *, nprobe: int = DEFAULT_NPROBE
           ) -> tuple[np.ndarray, np.ndarray]:
    """queries (Q, E) unit rows -> scores (Q, k), ids (Q, k); id -1 pads when fewer than k exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(int(k), max(index.ntotal, 1)))
    if faiss.try_extract_index_ivf(index) is not None:
        return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=max(1, int(nprobe))))
    return index.search(queries, k)


def write_atomic(index: faiss.Index, path: Path, *, before_replace=None) -> None:
    """Write `index` to `path` so that `path` holds either its old content or all of the new:
    a temporary file in the same folder, fsynced, then renamed over `path`, then the
    folder fsynced so the rename itself survives a power cut. `before_replace` is a hook
    for the crash tests."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
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
