"""The float16 re-ranking file of an IVF-PQ index: `rerank-<generation>.f16`.

IVF-PQ re-ranks its shortlist (k x refine candidates) with the stored vectors. Read from SQLite
that costs one B-tree lookup per candidate (~3.4 ms for 400 at 1M x 512); from this file,
memory-mapped read-only, a gather (~1 ms; docs/index-at-scale.md). The file is derived data,
like the FAISS file: made from SQLite (or from the previous generation's file patched with the
update's diff), named by the generation it holds, written atomically (temp + fsync + rename +
folder fsync), and checked on open; a file that is missing, truncated or of another generation
is rebuilt from SQLite, or, when it cannot be written, SQLite re-ranks instead.

Layout (little-endian): a 64-byte header (magic, generation, dim, count), the `count` row ids
(int64, ascending), then the `count` x `dim` vectors (float16, the same order). float16 keeps
~3 significant digits: a cosine from it is within ~1e-3 of the float32 one (unit vectors).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .vectors import replace_atomically

MAGIC = b"MMRRF16\x01"
HEADER = struct.Struct("<8sqqq")  # magic, generation, dim, count
HEADER_BYTES = 64
PATTERN = "rerank-{generation:08d}.f16"
CHUNK_ROWS = 65_536  # rows written at a time (64 MB of float16 at 512-d)


def expected_size(dim: int, count: int) -> int:
    return HEADER_BYTES + 8 * count + 2 * dim * count


class HalfVectors:
    """One generation's float16 vectors, memory-mapped read-only; `fetch(ids)` for `vectors.rerank`."""

    def __init__(self, path: Path, generation: int, ids: np.ndarray, vectors: np.ndarray):
        self.path, self.generation, self.ids, self.vectors = path, generation, ids, vectors

    @classmethod
    def open(cls, path: Path, generation: int, dim: int, count: int) -> HalfVectors | None:
        """The file if it holds this generation, dimension and count, complete; else None."""
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
        except OSError:
            return None
        if len(head) != HEADER.size:
            return None
        magic, file_generation, file_dim, file_count = HEADER.unpack(head)
        if (magic, file_generation, file_dim, file_count) != (MAGIC, generation, dim, count):
            return None
        if size != expected_size(dim, count):
            return None  # truncated (or padded): not this writer's output
        if count == 0:
            return cls(path, generation, np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float16))
        ids = np.memmap(path, dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(count,))
        vectors = np.memmap(path, dtype="<f2", mode="r", offset=HEADER_BYTES + 8 * count, shape=(count, dim))
        return cls(path, generation, ids, vectors)

    def matches(self, ids: np.ndarray) -> bool:
        """True when the file holds exactly these row ids (ascending)."""
        return len(ids) == len(self.ids) and bool(np.array_equal(self.ids, ids))

    def fetch(self, wanted) -> np.ndarray:
        """(len(wanted), dim) float32 vectors of these ids (ascending, as `vectors.rerank` asks)."""
        wanted = np.asarray(wanted, dtype=np.int64)
        positions = np.searchsorted(self.ids, wanted)
        positions = np.minimum(positions, max(len(self.ids) - 1, 0))
        if not len(self.ids) or not np.array_equal(self.ids[positions], wanted):
            raise LookupError(f"{self.path.name}: some of {len(wanted)} vector ids are not in the file")
        return to_float32(self.vectors[positions])


def to_float32(rows: np.ndarray) -> np.ndarray:
    """float16 rows -> float32, on this thread (numpy: ~0.3-0.5 ms for 400 x 512). Not torch: its
    conversion is 0.1 ms on one thread but runs on its intra-op pool, and on a busy machine the pool
    waits for its other threads (measured 8 ms on 2 shared cores); FAISS's fp16 decoder likewise.
    """
    return rows.astype(np.float32)


def write(path: Path, generation: int, ids: np.ndarray, rows, dim: int, *, before_replace=None) -> None:
    """Write ids (ascending) and their vectors to `path` atomically. `rows(start, stop)` returns the
    vectors of ids[start:stop] (any float dtype); they are stored as float16."""
    count = len(ids)

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, generation, dim, count).ljust(HEADER_BYTES, b"\0"))
            f.write(np.ascontiguousarray(ids, dtype="<i8").tobytes())
            for start in range(0, count, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, count)
                f.write(np.ascontiguousarray(rows(start, stop), dtype="<f2").reshape(stop - start, dim).tobytes())

    replace_atomically(path, fill, before_replace=before_replace)


def write_arrays(path: Path, generation: int, ids: np.ndarray, vectors: np.ndarray, **options) -> None:
    """`write` from in-memory arrays (ids in any order: sorted here)."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    vectors = np.asarray(vectors).reshape(len(ids), -1)
    sorted_ids = ids[order]
    write(path, generation, sorted_ids, lambda a, b: vectors[order[a:b]], vectors.shape[1], **options)


def write_patched(path: Path, generation: int, old: HalfVectors, removed_ids, added_ids, added_vectors,
                  **options) -> None:
    """The previous generation's file with `removed_ids` dropped and (added_ids, added_vectors)
    put in (a changed file's id is both removed and added), written as `path`. Reads the old
    file once and writes the new one in chunks: no SQLite reads, O(chunk) memory besides the ids."""
    added_ids = np.asarray(added_ids, dtype=np.int64)
    added_vectors = np.asarray(added_vectors, dtype=np.float32).reshape(len(added_ids), old.vectors.shape[1])
    order = np.argsort(added_ids, kind="stable")
    added_ids, added_vectors = added_ids[order], added_vectors[order]
    drop = np.union1d(np.asarray(list(removed_ids), dtype=np.int64), added_ids)
    kept = np.asarray(old.ids)[~np.isin(old.ids, drop)]
    ids = np.union1d(kept, added_ids)
    is_new = np.isin(ids, added_ids)
    dim = old.vectors.shape[1]

    def rows(start: int, stop: int) -> np.ndarray:
        chunk, new = ids[start:stop], is_new[start:stop]
        out = np.empty((stop - start, dim), dtype=np.float16)
        out[~new] = old.vectors[np.searchsorted(old.ids, chunk[~new])]
        out[new] = added_vectors[np.searchsorted(added_ids, chunk[new])]
        return out

    write(path, generation, ids, rows, dim, **options)
