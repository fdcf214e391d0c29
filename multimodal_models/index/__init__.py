"""A persistent, incremental, crash-safe image index: search a folder of images by text or image.

    multimodal index photos/                      # writes photos/.multimodal-index
    multimodal search photos/ "a red circle" -k 5
    multimodal search photos/ --image query.png --json

    from multimodal_models.index import ImageIndex
    index = ImageIndex.open("photos/.multimodal-index", create=True)
    index.update("photos", model)                 # model: a DualEncoder (or anything with embed_images)
    index.search_text(model, "a red circle", k=5) # [SearchHit(path, score, caption, id)]
    index.search_image(model, "query.png"); index.search_vector(v, k); len(index)

On disk, an index is a folder:

    index.sqlite (+ -wal, -shm)   SQLite in WAL mode: the source of truth
    vectors-<generation>.faiss    FAISS index of the published vectors, derived from SQLite
    rerank-<generation>.f16       IVF-PQ only: the published vectors in float16 (sorted ids, then
                                  rows), memory-mapped to re-rank the shortlist; derived from SQLite
    update.lock                   held (flock) by the one update allowed at a time

SQLite holds, per image, its path relative to the folder, size, mtime, sha256 of the
bytes, width/height (upright, after EXIF rotation), optional caption, and its embedding
(float32 blob); and in `info`, which model built the index (name, fingerprint of its
config + preprocessing + weights, embedding dim). An update with another model is refused:
vectors of two models do not live in one space.

An update
  1. scans the folder (recursively; by extension; hidden entries and the index skipped);
  2. plans: a file whose size and mtime equal its indexed row is unchanged and not read;
     any other is read and hashed, and the hash decides: same content (touched, copied,
     renamed) -> the vector is reused; new content -> decoded with `load_image` (a file
     that is no image is reported, not indexed) and embedded;
  3. embeds in batches (tqdm progress) and commits each batch in one transaction to the
     `staged` table, which searches never read;
  4. publishes in one transaction: staged rows move into `files`, rows of removed files
     are deleted, `generation` is incremented if the vector set changed;
  5. writes (IVF-PQ) `rerank-<generation>.f16`, then `vectors-<generation>.faiss`, each the
     previous generation's file patched with the diff, or rebuilt from SQLite, to a temp file,
     fsyncs, renames it into place, fsyncs the folder; then deletes older generations.

Why a kill -9 at any moment cannot leave a broken index
  - SQLite (WAL, synchronous=FULL) makes each transaction all-or-nothing, durably; so the
    database is always at some commit.
  - The published index (`files` + `generation`) changes only in step 4's single
    transaction: a reader sees the old index or the new one, never part of an update.
    Before that commit the old index is intact; after it, the new one is complete.
  - Work done before a crash is the committed batches in `staged`. A rerun finds each
    staged row whose path, size and mtime still match the file and takes it as done, so
    finished batches are never embedded again; a half-done batch was never committed and
    is simply redone. Staged rows that no longer match their file are discarded.
  - The FAISS file and the float16 file are derived data, each named by the generation it
    holds and written atomically (temp + rename), so a partial file never carries a real name,
    and a file from another generation is never mistaken for the current one. On open, the
    FAISS file for SQLite's current generation is used if it exists and agrees (dimension,
    count), the float16 file if its header (generation, dimension, count), its size and its id
    column agree with the snapshot's files; otherwise either is rebuilt from the vectors in
    SQLite (and saved; when the folder cannot be written, SQLite re-ranks). An update never
    writes into a published file: the next generation gets new files, so a reader of the
    previous generation (whose mapping outlives the deletion) never sees its rows. Leftover
    temp files and old generations are deleted by the next update.
  - One writer at a time: an flock on `update.lock`, which the kernel releases when the
    process dies, so a killed update never leaves a stale lock.
  - Searches run in one SQLite read transaction (a snapshot): the generation is checked,
    the matching FAISS index used, and the hit ids turned into paths from the same
    snapshot; a search during an update sees the previous generation.

The index type follows the size, or `--index-type` (stored in the index): exact
(`IDMap,Flat`, inner product = cosine on unit vectors) below `approximate_threshold` images
(default 100,000; `--approx-threshold`), IVF-Flat above it, and IVF-PQ from the compressed
threshold (1M; `--compressed-threshold`): 64-byte codes whose shortlist (k x `refine`) is
re-ranked with the float16 vectors of `rerank-<generation>.f16` (cosine error <= ~1e-3), and
whose final k are scored with their exact float32 vectors from SQLite: the scores returned are
exact cosines, and the ids are those of re-ranking from SQLite but for near-ties within ~1e-3.
HNSW by flag.
`nprobe` and `refine` trade speed for recall. An index split across machines or folders is
searched as one with `ShardedIndex` (`multimodal search INDEX --shard OTHER`): the same top-k as
one index over all the vectors. `benchmarks/index_search.py` measures every type beside exact
search, and docs/index-at-scale.md projects 100M images.
"""

from .image_index import (
    DEFAULT_INDEX_DIRNAME,
    IMAGE_EXTENSIONS,
    ImageIndex,
    IndexEntry,
    SearchHit,
    ShardedIndex,
    UpdateReport,
    model_fingerprint,
    scan_folder,
)
from .vectors import DEFAULT_APPROXIMATE_THRESHOLD, DEFAULT_NPROBE

__all__ = [
    "DEFAULT_APPROXIMATE_THRESHOLD",
    "DEFAULT_INDEX_DIRNAME",
    "DEFAULT_NPROBE",
    "IMAGE_EXTENSIONS",
    "ImageIndex",
    "IndexEntry",
    "SearchHit",
    "ShardedIndex",
    "UpdateReport",
    "model_fingerprint",
    "scan_folder",
]
