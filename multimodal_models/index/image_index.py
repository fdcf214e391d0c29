"""`ImageIndex`: a folder of images, embedded by a dual encoder, searchable by text or image.

The design (files on disk, what each update does, why a crash cannot break it) is in the
package docstring, `multimodal_models/index/__init__.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import stat
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..data.images import ImageLoadError, load_image
from ..errors import MultimodalError
from . import halfvectors as H
from . import store
from . import vectors as V

DB_NAME = "index.sqlite"
LOCK_NAME = "update.lock"
FAISS_PATTERN = "vectors-{generation:08d}.faiss"
DEFAULT_INDEX_DIRNAME = ".multimodal-index"  # `multimodal index DIR` writes DIR/.multimodal-index by default
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif"})
# Decoded pixels one batch may hold (RGB: ~0.75 GB); a batch of large photos is cut short.
BATCH_PIXEL_BUDGET = 256_000_000
# Rows that need no model (moved or touched files, broken files) committed together at most.
MAX_ROWS_PER_COMMIT = 4096
# Test hook: kill -9 this process at a named point of an update (see tests/test_index.py).
CRASH_ENV = "MULTIMODAL_INDEX_CRASH_AT"


class SearchHit(NamedTuple):
    path: str  # relative to the indexed folder, '/'-separated
    score: float  # cosine similarity of the query and the image
    caption: str | None  # from --caption, else None
    id: int  # the file's row id (stable across updates while the file keeps its content)


class IndexEntry(NamedTuple):
    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    caption: str | None
    vector: np.ndarray  # (E,) float32, unit length


@dataclasses.dataclass
class UpdateReport:
    """What one `ImageIndex.update` did. Counts are files."""

    folder: str
    index: str
    model: str
    images: int = 0  # image files found (by extension)
    unchanged: int = 0  # same size and mtime as indexed: not read
    added: int = 0  # new in the index
    changed: int = 0  # content changed: new vector
    updated: int = 0  # metadata only (touched or renamed with the same content, new caption): vector kept
    removed: int = 0  # gone from the folder (or no longer a readable image)
    resumed: int = 0  # finished by an interrupted earlier run, taken from its committed batches
    embedded: int = 0  # images the model embedded in this run
    captioned: int = 0  # images the captioner described in this run
    reused: int = 0  # vectors copied from an indexed file with the same sha256 instead of embedding
    batches: int = 0  # transactions committed before publishing
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why) not indexed
    total: int = 0  # files in the index afterwards
    generation: int = 0  # of the vector set afterwards
    kind: str = "flat"  # "flat" (exact), "ivf", "ivfpq" or "hnsw" (approximate)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["rejected"] = [{"path": p, "error": e} for p, e in self.rejected]
        return out


# --- the model's identity -------------------------------------------------------------------


def model_fingerprint(model: Any) -> str:
    """A digest that changes whenever the image embeddings could: class, config, image
    preprocessing and every weight. An object with a `fingerprint` attribute (or method)
    names itself instead."""
    own = getattr(model, "fingerprint", None)
    if own is not None:
        return str(own() if callable(own) else own)
    if not hasattr(model, "state_dict"):
        raise TypeError(f"cannot identify a {type(model).__name__} as an embedding model: it has neither a "
                        "`fingerprint` nor a `state_dict`")
    import torch

    digest = hashlib.sha256(type(model).__qualname__.encode())
    for part in (getattr(model, "config", None), getattr(model, "image_processor", None)):
        if dataclasses.is_dataclass(part):
            digest.update(json.dumps(dataclasses.asdict(part), sort_keys=True, default=str).encode())
    for name, value in sorted(model.state_dict().items()):
        for tensor in _tensors(value):
            tensor = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{tensor.dtype}:{tensor.numel()};".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _tensors(value) -> list:
    """The plain tensors of one state_dict entry: itself, or for an int8 layer (quantize="int8") its
    packed (weight, bias) with the weight's integers and per-channel scales."""
    import torch

    if isinstance(value, torch.Tensor):
        if not value.is_quantized:
            return [value]
        scales = (value.q_per_channel_scales() if value.qscheme() in (torch.per_channel_affine,
                                                                       torch.per_channel_symmetric)
                  else torch.tensor([value.q_scale()]))
        return [value.int_repr(), scales]
    if isinstance(value, (tuple, list)):
        return [t for part in value for t in _tensors(part)]
    return []  # e.g. the dtype a packed layer records


def _dtype_name(model: Any) -> str | None:
    """The dtype of a model's floating-point weights ("float32", "bfloat16", ...), None if it has none."""
    parameters = getattr(model, "parameters", None)
    for parameter in parameters() if callable(parameters) else ():
        if parameter.is_floating_point():
            return str(parameter.dtype).removeprefix("torch.")
    return None


def default_model_name(model: Any) -> str:
    return str(getattr(model, "name_or_path", None) or type(model).__name__)


# --- the folder -----------------------------------------------------------------------------


def scan_folder(folder: Path, *, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the image files under `folder`, sorted by path.

    Image files are chosen by extension here (their content is checked when they are read).
    Hidden files and folders (name starting with '.') are skipped, and so is `exclude` (the
    index's own folder); symbolic links to folders are not followed (no cycles). A file
    that cannot be stat-ed (dangling link, no permission) gets (-1, -1): reading it will
    fail and report why.
    """
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and (exclude is None or Path(dirpath, d).resolve() != exclude)]
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, folder)).as_posix()
            try:
                info = os.stat(full)
            except OSError:
                found[rel] = (-1, -1)
                continue
            if stat.S_ISREG(info.st_mode):
                found[rel] = (info.st_size, info.st_mtime_ns)
    return dict(sorted(found.items()))


def _crash_point(name: str) -> None:
    """For the crash tests only: die here, like `kill -9`, when CRASH_ENV names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class _Pending(NamedTuple):
    path: str
    size: int
    mtime_ns: int
    sha256: str
    image: Any  # decoded RGB PIL image
    vector: bytes | None  # known already (same content indexed): only the caption is missing
    caption: str | None


@dataclasses.dataclass
class _Diff:
    """What a publish changed in the vector set, for patching the FAISS index."""

    old_generation: int
    generation: int
    old_count: int
    count: int
    removed_ids: list[int]
    added: list[tuple[int, bytes]]


# --- the index ------------------------------------------------------------------------------


class ImageIndex:
    """An image index on disk (a folder); see the package docstring.

        index = ImageIndex.open("photos/.multimodal-index", create=True)
        index.update("photos", model)              # embeds only what is new or changed
        index.search_text(model, "a red circle", k=5)  # [SearchHit(path, score, caption, id)]

    Any number of processes may search while one updates; a second concurrent update is
    refused. Search results always come from one published generation.
    """

    def __init__(self, path: Path, conn, *, nprobe: int, refine: int = V.DEFAULT_REFINE):
        self.path = path
        self.nprobe = nprobe
        self.refine = refine
        self._conn = conn
        self._lock = threading.RLock()
        self._faiss = None
        self._faiss_generation: int | None = None
        self._half: H.HalfVectors | None = None  # the float16 re-ranking file of the IVF-PQ index
        self._half_generation: int | None = None  # the generation `_half` was looked up for (None: not yet)
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, nprobe: int = V.DEFAULT_NPROBE,
             refine: int = V.DEFAULT_REFINE) -> ImageIndex:
        """Open the index folder `path` (or a folder of images holding one in `.multimodal-index`).

        create=True makes a new empty index when `path` does not hold one (the folder
        must not exist yet, or be empty). `nprobe`: IVF lists scanned per query (approximate
        indexes only; more is slower and finds more of the true neighbours). `refine`: an IVF-PQ
        index re-ranks the best k x refine candidates of its codes with the exact vectors.
        """
        path = Path(path).expanduser()
        if not (path / DB_NAME).is_file() and (path / DEFAULT_INDEX_DIRNAME / DB_NAME).is_file():
            path = path / DEFAULT_INDEX_DIRNAME
        if not (path / DB_NAME).is_file():
            if not create:
                raise FileNotFoundError(f"no image index at {path} ({DB_NAME} is missing); build one with "
                                        f"'multimodal index FOLDER --out {path}'")
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise MultimodalError(f"will not create an image index in {path}: it exists and is not an empty "
                                      "folder; choose another --out")
            path.mkdir(parents=True, exist_ok=True)
            conn = store.connect(path / DB_NAME)
            store.create_schema(conn)
        else:
            conn = store.connect(path / DB_NAME)
        version = store.read_info(conn).get("format_version")
        if version != store.FORMAT_VERSION:
            conn.close()
            raise MultimodalError(f"{path / DB_NAME}: index format version {version!r}; this package reads version "
                                  f"{store.FORMAT_VERSION!r}. Rebuild the index into a new folder.")
        if nprobe < 1 or refine < 1:
            conn.close()
            raise ValueError(f"nprobe and refine must be at least 1, got {nprobe} and {refine}")
        return cls(path.resolve(), conn, nprobe=nprobe, refine=refine)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._faiss = None
            self._half, self._half_generation = None, None

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds -----------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM files").fetchone()[0]

    @property
    def info(self) -> dict[str, Any]:
        """Settings and provenance: model_name, model_fingerprint, embed_dim, generation, root, ..."""
        with self._lock:
            info: dict[str, Any] = store.read_info(self._conn)
        for key in ("embed_dim", "generation", "approximate_threshold", "compressed_threshold"):
            if key in info:
                info[key] = int(info[key])
        return info

    @property
    def root(self) -> Path | None:
        """The folder the index was last updated from (absolute), or None before the first update."""
        root = self.info.get("root")
        return Path(root) if root else None

    def entries(self) -> Iterator[IndexEntry]:
        """Every indexed image, in path order (one consistent snapshot)."""
        with self._lock, store.read_transaction(self._conn):
            dim = self.info.get("embed_dim")
            rows = self._conn.execute(f"SELECT {store.FILE_COLUMNS} FROM files ORDER BY path").fetchall()
        for *fields, blob in rows:
            yield IndexEntry(*fields, store.vector_array(blob, dim))

    def verify(self) -> dict[str, Any]:
        """Check that the FAISS index and SQLite agree (ids, count, dimension); raise if not.
        Returns a short summary. Used after crashes in the tests; cheap enough for a health check."""
        with self._lock, store.read_transaction(self._conn):
            info = self.info
            ids = np.array([r for (r,) in self._conn.execute("SELECT id FROM files")], dtype=np.int64)
            staged = self._conn.execute("SELECT count(*) FROM staged").fetchone()[0]
            index = self._current_faiss()
        problems = []
        if index is None:
            if len(ids):
                problems.append(f"{len(ids)} files but no embedding dimension recorded")
        else:
            if index.d != info["embed_dim"]:
                problems.append(f"FAISS dimension {index.d} != embed_dim {info['embed_dim']}")
            if not np.array_equal(np.sort(V.stored_ids(index)), np.sort(ids)):
                problems.append(f"FAISS holds {index.ntotal} ids, SQLite {len(ids)} files, and they differ")
        if problems:
            raise MultimodalError(f"{self.path}: inconsistent index: " + "; ".join(problems))
        return {"files": len(ids), "generation": info["generation"], "staged": staged,
                "kind": V.kind_of(index) if index is not None else None}

    # -- searching ---------------------------------------------------------------------------

    def search_vectors(self, queries, k: int = 10) -> list[list[SearchHit]]:
        """(Q, E) query vectors -> for each, up to k hits, best first (cosine similarity)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._lock, store.read_transaction(self._conn):
            dim = self.info.get("embed_dim")
            if dim is None:  # nothing indexed yet
                return [[] for _ in range(len(np.atleast_2d(np.asarray(queries))))]
            q = V.as_unit_rows(queries, dim, what="query vectors")
            index = self._current_faiss()
            exact = lambda wanted: store.vectors_by_id(self._conn, wanted, dim)
            half = self._current_half(index) if V.kind_of(index) == "ivfpq" else None
            if half is not None:  # shortlist re-ranked from the float16 file, the final k scored exactly
                scores, ids = V.search(index, q, k, nprobe=self.nprobe, refine=self.refine, fetch=half.fetch,
                                       final=exact)
            else:
                scores, ids = V.search(index, q, k, nprobe=self.nprobe, refine=self.refine, fetch=exact)
            wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
            rows: dict[int, tuple[str, str | None]] = {}
            for start in range(0, len(wanted), 500):  # SQLite caps the number of '?' per statement
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row_id, path, caption in self._conn.execute(
                        f"SELECT id, path, caption FROM files WHERE id IN ({marks})", chunk):
                    rows[row_id] = (path, caption)
        return [[SearchHit(rows[int(i)][0], float(s), rows[int(i)][1], int(i))
                 for s, i in zip(score_row, id_row) if i >= 0 and int(i) in rows]
                for score_row, id_row in zip(scores, ids)]

    def search_vector(self, vector, k: int = 10) -> list[SearchHit]:
        """One query vector (E,) -> up to k hits, best first."""
        vector = V.as_unit_rows(vector, what="the query vector")
        if len(vector) != 1:
            raise ValueError(f"search_vector takes one vector, got {len(vector)}; use search_vectors")
        return self.search_vectors(vector, k)[0]

    def search_text(self, model, query: str, k: int = 10) -> list[SearchHit]:
        """Images matching a text, embedded by `model` (the model that built the index)."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the text query is empty")
        self.check_model(model)
        return self.search_vector(model.embed_texts([query]), k)

    def search_image(self, model, image, k: int = 10) -> list[SearchHit]:
        """Images similar to `image` (path, bytes, PIL image), embedded by `model`."""
        self.check_model(model)
        return self.search_vector(model.embed_images([load_image(image)]), k)

    def search(self, model, text: str | None = None, image=None, k: int = 10) -> list[SearchHit]:
        """By a text, an image, or both (the normalised sum of the two embeddings)."""
        if text is None and image is None:
            raise ValueError("give a text query, an image query, or both")
        if text is not None and not text.strip():
            raise ValueError("the text query is empty")
        self.check_model(model)
        parts = []
        if text is not None:
            parts.append(V.as_unit_rows(model.embed_texts([text]), what="the text embedding"))
        if image is not None:
            parts.append(V.as_unit_rows(model.embed_images([load_image(image)]), what="the image embedding"))
        return self.search_vector(np.sum(parts, axis=0), k)

    def check_model(self, model) -> None:
        """Raise unless `model` is the one that built the index (fingerprints compared)."""
        fingerprint = self._fingerprint(model)
        info = self.info
        expected = info.get("model_fingerprint")
        if expected is not None and expected != fingerprint:
            built_in, given_in = info.get("model_dtype"), _dtype_name(model)
            hint = (f" It was embedded in {built_in} and this model is in {given_in}: pass --dtype {built_in}."
                    if built_in and given_in and built_in != given_in else "")
            built_q, given_q = info.get("model_quantize"), getattr(model, "quantized", None)
            if built_q != given_q:
                hint += (f" It was embedded with --quantize {built_q}: pass it." if built_q else
                         f" It was embedded without quantization: drop --quantize {given_q}.")
            raise MultimodalError(
                f"the index {self.path} was built with the model '{info.get('model_name')}' (fingerprint {expected}); "
                f"'{default_model_name(model)}' (fingerprint {fingerprint}) embeds into a different space.{hint} "
                f"Use the same model, or build a new index with another --out"
            )

    def _fingerprint(self, model) -> str:
        """model_fingerprint(model), computed once per model object (hashing the weights takes a moment)."""
        try:
            return self._fingerprints[model]
        except (KeyError, TypeError):
            pass
        fingerprint = model_fingerprint(model)
        try:
            self._fingerprints[model] = fingerprint
        except TypeError:  # not weak-referenceable: computed again next time
            pass
        return fingerprint

    def _current_faiss(self):
        """The FAISS index of the published generation (call inside a read transaction).

        Loaded from `vectors-<generation>.faiss` when that file exists and agrees with SQLite
        (dimension, count); else rebuilt from the vectors in SQLite (the source of truth) and
        saved for the next reader when the folder is writable."""
        info = store.read_info(self._conn)
        if "embed_dim" not in info:
            return None
        generation, dim = int(info["generation"]), int(info["embed_dim"])
        if self._faiss is not None and self._faiss_generation == generation:
            return self._faiss
        count = self._conn.execute("SELECT count(*) FROM files").fetchone()[0]
        index = self._read_faiss(generation, dim, count)
        if index is None:
            ids, vectors = store.all_vectors(self._conn, dim)
            index = V.build(ids, vectors, dim, *self._kind_settings(info))
            try:
                V.write_atomic(index, self._faiss_path(generation))
            except OSError:  # a read-only copy of the index: search from memory
                pass
        self._faiss, self._faiss_generation = index, generation
        return index

    def _current_half(self, index) -> H.HalfVectors | None:
        """The float16 re-ranking file of the published generation (call inside the search's read
        transaction, after `_current_faiss`): `rerank-<generation>.f16` when it holds exactly the ids
        of this snapshot's files, else rebuilt from SQLite and saved; None (SQLite re-ranks) when it
        cannot be written."""
        generation = self._faiss_generation
        if self._half_generation == generation:
            return self._half
        dim = index.d
        ids = np.fromiter((r for (r,) in self._conn.execute("SELECT id FROM files ORDER BY id")), dtype=np.int64)
        half = H.HalfVectors.open(self._half_path(generation), generation, dim, len(ids))
        if half is None or not half.matches(ids):
            half = None
            all_ids, vectors = store.all_vectors(self._conn, dim)
            try:
                H.write_arrays(self._half_path(generation), generation, all_ids, vectors)
                half = H.HalfVectors.open(self._half_path(generation), generation, dim, len(all_ids))
            except OSError:  # a read-only copy of the index: re-rank from SQLite
                half = None
        self._half, self._half_generation = half, generation
        return half

    def _half_path(self, generation: int) -> Path:
        return self.path / H.PATTERN.format(generation=generation)

    def _write_half(self, diff: _Diff, index) -> None:
        """Make `rerank-<generation>.f16` for the published generation of an IVF-PQ index: kept when it
        is already there (a crashed run wrote it), else the previous generation's file patched with the
        diff, else rebuilt from SQLite; written atomically."""
        dim, path = index.d, self._half_path(diff.generation)
        if H.HalfVectors.open(path, diff.generation, dim, diff.count) is not None:
            return
        hook = {"before_replace": lambda: _crash_point("rerank-tmp")}
        old = (H.HalfVectors.open(self._half_path(diff.old_generation), diff.old_generation, dim, diff.old_count)
               if diff.generation != diff.old_generation else None)
        if old is not None:
            added = [i for i, _ in diff.added]
            vectors = (np.stack([np.frombuffer(v, dtype="<f4") for _, v in diff.added]) if added
                       else np.zeros((0, dim), dtype=np.float32))
            H.write_patched(path, diff.generation, old, diff.removed_ids, added, vectors, **hook)
        else:
            with store.read_transaction(self._conn):
                ids, vectors = store.all_vectors(self._conn, dim)
            H.write_arrays(path, diff.generation, ids, vectors, **hook)
        _crash_point("rerank-replaced")

    def _read_faiss(self, generation: int, dim: int, count: int):
        path = self._faiss_path(generation)
        if not path.is_file():
            return None
        try:
            index = V.read(path)
        except (RuntimeError, OSError):  # unreadable: rebuilt from SQLite
            return None
        return index if index.d == dim and index.ntotal == count else None

    def _faiss_path(self, generation: int) -> Path:
        return self.path / FAISS_PATTERN.format(generation=generation)

    @staticmethod
    def _kind_settings(info: dict) -> tuple[int, str, int]:
        """(approximate_threshold, index_type, compressed_threshold) as the index records them."""
        return (int(info.get("approximate_threshold", V.DEFAULT_APPROXIMATE_THRESHOLD)), info.get("index_type", "auto"),
                int(info.get("compressed_threshold", V.DEFAULT_COMPRESSED_THRESHOLD)))

    # -- updating ----------------------------------------------------------------------------

    def update(self, folder: str | os.PathLike, model, *, model_name: str | None = None, batch_size: int = 32,
               captioner=None, captioner_name: str | None = None, approximate_threshold: int | None = None,
               index_type: str | None = None, compressed_threshold: int | None = None,
               progress: bool = True) -> UpdateReport:
        """Bring the index in line with `folder`: embed new and changed images, drop removed ones.

        model: anything with `embed_images(list of PIL images) -> (N, E)` (a DualEncoder);
            it must be the model that built the index.
        captioner: optional; a VLM (`caption_batch(images=...)` or `caption(image)`) whose
            caption is stored with each image (also added to already indexed images that lack one).
        approximate_threshold: from this many images up, search is approximate (IVF);
            a value given is remembered by the index. Default 100000.
        index_type: "flat", "ivf", "ivfpq" or "hnsw" whatever the size, or "auto" (by size: flat,
            ivf from approximate_threshold, ivfpq from compressed_threshold, default 1000000);
            remembered by the index (changing it rebuilds the FAISS file). See `vectors.py`.
        Every `batch_size` images are committed together, so an interrupted update resumes
        where it stopped; searches see the old index until the update publishes.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for what, value in (("approximate_threshold", approximate_threshold),
                            ("compressed_threshold", compressed_threshold)):
            if value is not None and value < 1:
                raise ValueError(f"{what} must be at least 1, got {value}")
        if index_type is not None:
            V.check_type(index_type)
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        start = time.perf_counter()
        with self._lock, _exclusive_lock(self.path / LOCK_NAME, self.path):
            name = model_name or default_model_name(model)
            self._claim_model(model, name, folder, approximate_threshold,
                              captioner_name or (default_model_name(captioner) if captioner else None),
                              index_type=index_type, compressed_threshold=compressed_threshold)
            report = UpdateReport(folder=str(folder), index=str(self.path), model=name)
            scan = scan_folder(folder, exclude=self.path)
            report.images = len(scan)
            candidates = self._plan(scan, captioning=captioner is not None, report=report)
            self._process(folder, scan, candidates, model, captioner, batch_size, report, progress)
            _crash_point("before-publish")
            diff = self._publish(scan, folder, report)
            _crash_point("after-publish")
            self._write_faiss(diff)
            self._remove_stale_files(diff.generation)
            report.total = diff.count
            report.generation = diff.generation
            report.kind = V.kind_of(self._faiss) if self._faiss is not None else "flat"
            report.rejected = [(p, e) for p, e in self._conn.execute("SELECT path, error FROM rejected ORDER BY path")]
        report.seconds = round(time.perf_counter() - start, 3)
        return report

    def _claim_model(self, model, name: str, folder: Path, threshold: int | None, captioner_name: str | None, *,
                     index_type: str | None = None, compressed_threshold: int | None = None) -> None:
        """Record the model on first use, refuse a different one afterwards; drop staged work
        that an interrupted update left for another folder."""
        self.check_model(model)
        fingerprint = self._fingerprint(model)
        with store.write_transaction(self._conn):
            info = store.read_info(self._conn)
            if "model_fingerprint" not in info:
                store.set_info(self._conn, model_fingerprint=fingerprint, model_name=name, model_dtype=_dtype_name(model),
                               created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                if getattr(model, "quantized", None):
                    store.set_info(self._conn, model_quantize=model.quantized)
            if threshold is not None:
                store.set_info(self._conn, approximate_threshold=threshold)
            if index_type is not None:
                store.set_info(self._conn, index_type=index_type)
            if compressed_threshold is not None:
                store.set_info(self._conn, compressed_threshold=compressed_threshold)
            if captioner_name is not None:
                store.set_info(self._conn, caption_model=captioner_name)
            if info.get("staged_root") not in (None, str(folder)):
                self._conn.execute("DELETE FROM staged")
            store.set_info(self._conn, staged_root=str(folder))

    def _plan(self, scan: dict[str, tuple[int, int]], *, captioning: bool, report: UpdateReport) -> list[str]:
        """The files that must be read: not indexed, or with another size or mtime than indexed
        (the sha256 then tells a real change from a touch), or lacking a wanted caption."""
        published = {p: (s, m, c) for p, s, m, c in
                     self._conn.execute("SELECT path, size, mtime_ns, caption IS NOT NULL FROM files")}
        staged = {p: (s, m, done) for p, s, m, done in self._conn.execute(
            "SELECT path, size, mtime_ns, (caption IS NOT NULL OR error IS NOT NULL) FROM staged")}
        rejected = {p: (s, m) for p, s, m in self._conn.execute("SELECT path, size, mtime_ns FROM rejected")}
        candidates = []
        for path, (size, mtime) in scan.items():
            pub = published.get(path)
            if pub is not None and pub[:2] == (size, mtime) and (pub[2] or not captioning):
                report.unchanged += 1
                continue
            done = staged.get(path)
            if done is not None and done[:2] == (size, mtime) and (done[2] or not captioning):
                report.resumed += 1
                continue
            if rejected.get(path) == (size, mtime):
                continue  # still the same broken file: reported again, not read again
            candidates.append(path)
        return candidates

    def _process(self, folder: Path, scan, candidates: list[str], model, captioner, batch_size: int,
                 report: UpdateReport, progress: bool) -> None:
        """Read, hash, decode, embed (and caption) the candidates; commit every batch to `staged`."""
        from tqdm import tqdm

        dim = self.info.get("embed_dim")
        rows: list[tuple] = []  # ready for `staged`
        pending: list[_Pending] = []  # need the model and/or the captioner
        pixels = 0

        def flush() -> None:
            nonlocal rows, pending, pixels, dim
            if pending:
                need_vectors = [p for p in pending if p.vector is None]
                vectors: dict[str, bytes] = {}
                if need_vectors:
                    out = model.embed_images([p.image for p in need_vectors])
                    array = V.as_unit_rows(out, dim, what=f"the embeddings of {report.model}")
                    if len(array) != len(need_vectors):
                        raise MultimodalError(f"{report.model} returned {len(array)} embeddings for "
                                              f"{len(need_vectors)} images")
                    dim = array.shape[1]
                    vectors = {p.path: store.vector_bytes(v) for p, v in zip(need_vectors, array)}
                    report.embedded += len(need_vectors)
                captions = {}
                if captioner is not None:
                    texts = _caption(captioner, [p.image for p in pending])
                    captions = {p.path: text for p, text in zip(pending, texts)}
                    report.captioned += len(pending)
                for p in pending:
                    vector = p.vector if p.vector is not None else vectors[p.path]
                    rows.append((p.path, p.size, p.mtime_ns, p.sha256, p.image.width, p.image.height,
                                 captions.get(p.path, p.caption), vector, None))
            if rows:
                with store.write_transaction(self._conn):
                    if dim is not None:
                        store.set_info(self._conn, embed_dim=dim)
                    self._conn.executemany("INSERT OR REPLACE INTO staged VALUES (?,?,?,?,?,?,?,?,?)", rows)
                report.batches += 1
                _crash_point(f"batch:{report.batches}")
            rows, pending, pixels = [], [], 0

        bar = tqdm(candidates, desc="indexing", unit="img", disable=not progress, dynamic_ncols=True)
        for path in bar:
            size, mtime = scan[path]
            full = folder / path
            try:
                data = full.read_bytes()
            except OSError as exc:
                rows.append((path, size, mtime, None, None, None, None, None, f"cannot read: {exc.strerror or exc}"))
                continue
            sha = hashlib.sha256(data).hexdigest()
            known = self._known_content(path, sha)  # (width, height, caption, vector) or None
            if known is not None and (captioner is None or known[2] is not None):
                rows.append((path, size, mtime, sha, *known, None))
                report.reused += 1
            else:
                try:
                    image = load_image(data, name=str(full))
                except ImageLoadError as exc:
                    rows.append((path, size, mtime, sha, None, None, None, None, str(exc).removeprefix(f"{full}: ")))
                else:
                    pending.append(_Pending(path, size, mtime, sha, image,
                                            known[3] if known else None, known[2] if known else None))
                    pixels += image.width * image.height
            if len(pending) >= batch_size or pixels >= BATCH_PIXEL_BUDGET or len(rows) >= MAX_ROWS_PER_COMMIT:
                flush()
        flush()
        bar.close()

    def _known_content(self, path: str, sha: str) -> tuple | None:
        """(width, height, caption, vector) of an image with this content already computed:
        the same file touched, or a copy or rename of an indexed one. The file's own row first."""
        for query in ("SELECT width, height, caption, vector FROM files WHERE sha256 = ? ORDER BY path != ? LIMIT 1",
                      "SELECT width, height, caption, vector FROM staged WHERE sha256 = ? AND vector IS NOT NULL "
                      "ORDER BY path != ? LIMIT 1"):
            row = self._conn.execute(query, (sha, path)).fetchone()
            if row is not None:
                return tuple(row)
        return None

    def _publish(self, scan: dict[str, tuple[int, int]], folder: Path, report: UpdateReport) -> _Diff:
        """One transaction: move the staged rows into `files`, drop removed files, bump the generation."""
        with store.write_transaction(self._conn):
            conn = self._conn
            old_generation = int(store.read_info(conn)["generation"])
            published = {p: (i, s) for i, p, s in conn.execute("SELECT id, path, sha256 FROM files")}
            old_count = len(published)
            removed_ids: list[int] = []
            added: list[tuple[int, bytes]] = []
            for row in map(store.Row._make, conn.execute(f"SELECT {store.FILE_COLUMNS}, error FROM staged").fetchall()):
                if scan.get(row.path) != (row.size, row.mtime_ns):
                    continue  # left by an interrupted run; the file has changed or gone since
                pub = published.get(row.path)
                if row.error is not None:
                    conn.execute("INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?)",
                                 (row.path, row.size, row.mtime_ns, row.error))
                    if pub is not None:  # was an image, is not any more
                        conn.execute("DELETE FROM files WHERE id = ?", (pub[0],))
                        removed_ids.append(pub[0])
                        del published[row.path]
                        report.removed += 1
                    continue
                conn.execute("DELETE FROM rejected WHERE path = ?", (row.path,))
                if pub is None:
                    cursor = conn.execute(f"INSERT INTO files ({store.FILE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                                          row[:8])
                    added.append((cursor.lastrowid, row.vector))
                    report.added += 1
                elif pub[1] != row.sha256:
                    conn.execute("UPDATE files SET size=?, mtime_ns=?, sha256=?, width=?, height=?, caption=?, "
                                 "vector=? WHERE id=?", (*row[1:8], pub[0]))
                    removed_ids.append(pub[0])
                    added.append((pub[0], row.vector))
                    report.changed += 1
                else:
                    conn.execute("UPDATE files SET size=?, mtime_ns=?, caption=coalesce(?, caption) WHERE id=?",
                                 (row.size, row.mtime_ns, row.caption, pub[0]))
                    report.updated += 1
            for path, (row_id, _) in published.items():
                if path not in scan:
                    conn.execute("DELETE FROM files WHERE id = ?", (row_id,))
                    removed_ids.append(row_id)
                    report.removed += 1
            for (path,) in conn.execute("SELECT path FROM rejected").fetchall():
                if path not in scan:
                    conn.execute("DELETE FROM rejected WHERE path = ?", (path,))
            conn.execute("DELETE FROM staged")
            generation = old_generation + 1 if (removed_ids or added) else old_generation
            store.set_info(conn, generation=generation, root=str(folder),
                           updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            count = conn.execute("SELECT count(*) FROM files").fetchone()[0]
        return _Diff(old_generation, generation, old_count, count, removed_ids, added)

    def _write_faiss(self, diff: _Diff) -> None:
        """Make `vectors-<generation>.faiss` for the published generation: the previous file
        patched with the diff when possible, else rebuilt from SQLite; written atomically."""
        info = self.info
        if "embed_dim" not in info:
            return  # nothing was ever embedded
        dim, settings = info["embed_dim"], self._kind_settings(info)
        index = self._read_faiss(diff.generation, dim, diff.count)
        if index is not None and not V.needs_rebuild(index, diff.count, *settings):
            if V.kind_of(index) == "ivfpq":
                self._write_half(diff, index)
            self._faiss, self._faiss_generation = index, diff.generation  # nothing changed, or a crashed run wrote it
            return
        index = None  # (a changed approximate_threshold rebuilds the same generation's file)
        if diff.generation != diff.old_generation:
            index = self._read_faiss(diff.old_generation, dim, diff.old_count)
            if index is not None and diff.removed_ids and not V.can_remove(index):
                index = None  # HNSW: rebuilt
            if index is not None:
                V.remove(index, diff.removed_ids)
                if diff.added:
                    V.add(index, np.array([i for i, _ in diff.added], dtype=np.int64),
                          np.stack([np.frombuffer(v, dtype="<f4") for _, v in diff.added]))
                if index.ntotal != diff.count or V.needs_rebuild(index, diff.count, *settings):
                    index = None
        if index is None:
            with store.read_transaction(self._conn):
                ids, vectors = store.all_vectors(self._conn, dim)
            index = V.build(ids, vectors, dim, *settings)
        if V.kind_of(index) == "ivfpq":
            self._write_half(diff, index)
        V.write_atomic(index, self._faiss_path(diff.generation), before_replace=lambda: _crash_point("faiss-tmp"))
        _crash_point("faiss-replaced")
        self._faiss, self._faiss_generation = index, diff.generation

    def _remove_stale_files(self, generation: int) -> None:
        """FAISS and float16 files of older generations (and the float16 file of an index that is
        no longer IVF-PQ), and temporary files of interrupted writes."""
        keep = {self._faiss_path(generation).name}
        if self._faiss is not None and V.kind_of(self._faiss) == "ivfpq":
            keep.add(self._half_path(generation).name)
        for path in self.path.iterdir():
            name = path.name
            stale_index = (name.startswith("vectors-") and name.endswith(".faiss")
                           or name.startswith("rerank-") and name.endswith(".f16")) and name not in keep
            stale_tmp = name.startswith((".vectors-", ".rerank-")) and name.endswith(".tmp")
            if stale_index or stale_tmp:
                path.unlink(missing_ok=True)


class ShardedIndex:
    """Several image indexes (shards of one collection, e.g. one per machine or per sub-folder, all
    built with the same model) searched together: each shard's top k, merged by score
    (`vectors.merge`). For exact (flat) shards the result is what one index over all of their
    images returns; approximate shards give near the same (each shard has its own lists).

        with ShardedIndex.open(["a/.multimodal-index", "b/.multimodal-index"]) as shards:
            shards.search_vector(v, k=10)  # [(shard number, SearchHit)]; hit.path relative to that shard's root
    """

    def __init__(self, shards: Sequence[ImageIndex]):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.shards = list(shards)
        models = {(s.info.get("model_fingerprint"), s.info.get("embed_dim")) for s in self.shards
                  if s.info.get("model_fingerprint") is not None}
        if len(models) > 1:
            names = ", ".join(f"{s.path}: {s.info.get('model_name')} ({s.info.get('model_fingerprint')})"
                              for s in self.shards)
            raise MultimodalError(f"the shards were built with different models ({names}); their vectors are not "
                                  "comparable")

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike], **options) -> ShardedIndex:
        """Open each path as `ImageIndex.open(path, **options)` does (nprobe, refine)."""
        opened: list[ImageIndex] = []
        try:
            for path in paths:
                opened.append(ImageIndex.open(path, **options))
            return cls(opened)
        except BaseException:
            for index in opened:
                index.close()
            raise

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def search_vectors(self, queries, k: int = 10) -> list[list[tuple[int, SearchHit]]]:
        """(Q, E) query vectors -> for each, up to k (shard number, hit), best first over all shards."""
        per_shard = [shard.search_vectors(queries, k) for shard in self.shards]
        merged = []
        for q in range(len(per_shard[0])):
            results = [(np.array([[h.score for h in hits[q]]], dtype=np.float32).reshape(1, -1),
                        np.array([[n for n in range(len(hits[q]))]], dtype=np.int64).reshape(1, -1))
                       for hits in per_shard]
            _, positions, shard_numbers = V.merge(results, k)
            merged.append([(int(s), per_shard[s][q][int(p)]) for p, s in zip(positions[0], shard_numbers[0]) if p >= 0])
        return merged

    def search_vector(self, vector, k: int = 10) -> list[tuple[int, SearchHit]]:
        return self.search_vectors(V.as_unit_rows(vector, what="the query vector")[:1], k)[0]

    def search(self, model, text: str | None = None, image=None, k: int = 10) -> list[tuple[int, SearchHit]]:
        """By a text, an image, or both, as `ImageIndex.search`."""
        if text is None and image is None:
            raise ValueError("give a text query, an image query, or both")
        if text is not None and not text.strip():
            raise ValueError("the text query is empty")
        for shard in self.shards:
            shard.check_model(model)
        parts = []
        if text is not None:
            parts.append(V.as_unit_rows(model.embed_texts([text]), what="the text embedding"))
        if image is not None:
            parts.append(V.as_unit_rows(model.embed_images([load_image(image)]), what="the image embedding"))
        return self.search_vector(np.sum(parts, axis=0), k)


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path, index_path: Path) -> Iterator[None]:
    """An exclusive flock for the length of an update; the kernel releases it when the
    process ends, however it ends (no stale lock after kill -9)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process guard
        yield
        return
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MultimodalError(f"another update of the index {index_path} is running; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _caption(captioner, images: Sequence) -> list[str]:
    if hasattr(captioner, "caption_batch"):
        texts = captioner.caption_batch(images=list(images))
    else:
        texts = [captioner.caption(image) for image in images]
    if len(texts) != len(images):
        raise MultimodalError(f"the captioner returned {len(texts)} captions for {len(images)} images")
    return [str(t).strip() for t in texts]
