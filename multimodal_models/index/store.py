"""The SQLite side of the image index: the source of truth for files, vectors and settings.

Tables (see the package docstring for how they make updates crash-safe):

- `info(key, value)`: format version, the model that built the index (name, fingerprint,
  embedding dim), the generation of the vector set, the indexed folder, settings.
- `files`: the published index, one row per image: path (relative to the folder, with
  '/'), size, mtime_ns, sha256, width, height, caption, vector (float32 little-endian).
  `id` (never reused) is the FAISS id.
- `staged`: rows an unfinished update has already computed; invisible to search. Same
  columns as `files`, plus `error` (then `vector` is NULL) for files that are not images.
- `rejected`: files with an image extension that failed to load, with the reason, so an
  unchanged broken file is reported without being read again.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMAT_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    caption TEXT,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE TABLE IF NOT EXISTS staged (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    width INTEGER,
    height INTEGER,
    caption TEXT,
    vector BLOB,
    error TEXT
);
CREATE INDEX IF NOT EXISTS staged_sha256 ON staged (sha256);
CREATE TABLE IF NOT EXISTS rejected (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    error TEXT NOT NULL
);
"""

FILE_COLUMNS = "path, size, mtime_ns, sha256, width, height, caption, vector"


class Row(NamedTuple):
    """One image as stored in `files` or `staged` (`error` set and `vector` None for a non-image)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    width: int | None
    height: int | None
    caption: str | None
    vector: bytes | None
    error: str | None = None


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database in WAL mode, autocommit: transactions are explicit."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=60.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed batch survives a power cut too, not only a killed process.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    with write_transaction(conn):
        # one statement at a time: executescript() would COMMIT the transaction
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO info VALUES ('format_version', ?)", (FORMAT_VERSION,))
        conn.execute("INSERT OR IGNORE INTO info VALUES ('generation', '0')")


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception: all of it lands or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A consistent snapshot for several SELECTs (WAL: writers are not blocked meanwhile)."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def read_info(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM info"))


def set_info(conn: sqlite3.Connection, **values) -> None:
    for key, value in values.items():
        conn.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (key, str(value)))


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_array(blob: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").reshape(dim).astype(np.float32)


def all_vectors(conn: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,), vectors (N, dim)) of the published files, in id order (call inside a read transaction)."""
    count = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    ids = np.empty(count, dtype=np.int64)
    vectors = np.empty((count, dim), dtype=np.float32)
    for i, (row_id, blob) in enumerate(conn.execute("SELECT id, vector FROM files ORDER BY id")):
        ids[i] = row_id
        vectors[i] = np.frombuffer(blob, dtype="<f4")
    return ids, vectors


def vectors_by_id(conn: sqlite3.Connection, ids, dim: int) -> np.ndarray:
    """(len(ids), dim) float32 vectors of the files with these ids, in their order (call inside the
    search's read transaction: the same snapshot as the FAISS index). IVF-PQ re-ranks with them."""
    ids = [int(i) for i in ids]
    out = np.empty((len(ids), dim), dtype=np.float32)
    position = {row_id: n for n, row_id in enumerate(ids)}
    found = 0
    for start in range(0, len(ids), 500):  # SQLite caps the number of '?' per statement
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row_id, blob in conn.execute(f"SELECT id, vector FROM files WHERE id IN ({marks})", chunk):
            out[position[row_id]] = np.frombuffer(blob, dtype="<f4")
            found += 1
    if found != len(position):
        raise LookupError(f"{len(position) - found} of {len(position)} vector ids are not in the index's files")
    return out
