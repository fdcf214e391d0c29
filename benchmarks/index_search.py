"""Search latency, recall, build time and memory of the image index types, beside exact search.

    .venv/bin/python benchmarks/index_search.py --sizes 1000000 --dim 512 --data clustered \\
        [--types ivf ivfpq hnsw] [--nprobe 8 16 32] [--refine 1 5 10 20] [--rerank-from sqlite memmap product] \\
        [--queries 200] [--threads 1] [--build-threads 2] [--vectors embeddings.npy]

For each collection size, every index is built by `multimodal_models.index.vectors` (what
`multimodal index` ships) over the same unit vectors, and the same queries run through all of
them in the same process, interleaved query by query, on `--threads` FAISS threads:

- `build_s`: training + adding, on `--build-threads` threads;
- `bytes_per_vector`: the index structure's serialized size / vectors: what it holds in RAM
  (codes or float32 vectors, ids, IVF centroids, PQ codebooks, HNSW graph), without the
  per-list allocation slack of std::vector (a few %). The exact vectors IVF-PQ re-ranks with
  are *not* counted: they stay in SQLite on disk (the index's source of truth), or in a float16
  file (`--rerank-from memmap`), read through the OS page cache;
- `single_ms`: p50 / p95 latency of one query at a time (k=10), re-ranking included;
- `recall_at_10`: the share of the exact top 10 found; `top1_agreement`.

IVF-PQ is measured per (nprobe, refine): FAISS returns 10 x refine candidates by their codes,
and those are re-ranked with exact vectors fetched from `--rerank-from` (refine 1: no re-ranking,
the codes' own ranking): `sqlite` (float32 rows by id), `memmap` (a plain float16 .npy, rows by
position), or `product`, what `ImageIndex` does: the shortlist re-ranked from its float16 file
(`halfvectors.HalfVectors`: ids looked up in the file's sorted id column), then the final k scored
with their exact float32 vectors from SQLite. With `product`, `rerank_file` times writing the file
(`write_s`) and what an update of `--update-rows` changed + as many added rows costs it: `patch_s`
(the previous generation's file rewritten with the diff, as the product does) against
`rebuild_from_sqlite_s` (every vector read from SQLite and written).

`uniform` data (unit vectors uniform on the sphere) is the hard case for any approximate index:
no clusters, neighbours barely closer than strangers. `clustered` data (a mixture of 1000
Gaussian blobs on the sphere) is closer to real embeddings. `--vectors FILE.npy` measures on
real embeddings instead (its last `--queries` rows are the queries, held out of the index).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from multimodal_models.index import halfvectors as H
from multimodal_models.index import store
from multimodal_models.index import vectors as V


def random_unit(n: int, dim: int, rng: np.random.Generator, kind: str, centres: np.ndarray | None) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: 1M x 512 float64 normals would take 4 GB at once
        m = min(100_000, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            x = centres[rng.integers(0, len(centres), m)] + x / np.sqrt(dim)
        out[start : start + m] = x
    faiss.normalize_L2(out)
    return out


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p95": round(float(np.percentile(ms, 95)), 3)}


def bytes_per_vector(index: faiss.Index) -> float:
    return round(len(faiss.serialize_index(index)) / max(index.ntotal, 1), 1)


def rerank_sources(data: np.ndarray, wanted: list[str], folder: Path, update_rows: int = 0) -> tuple[dict, dict]:
    """({name: search options}, update timings): SQLite as the index stores them (one row per id,
    float32 blob, read by `store.vectors_by_id`), a memory-mapped float16 .npy, or the product's
    float16 file + exact final scores from SQLite."""
    sources, update = {}, {}
    if "sqlite" in wanted or "product" in wanted:
        conn = sqlite3.connect(str(folder / "vectors.sqlite"), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
        conn.execute("BEGIN")
        for start in range(0, len(data), 50_000):
            chunk = data[start : start + 50_000]
            conn.executemany("INSERT INTO files VALUES (?, ?)",
                             ((start + i, store.vector_bytes(v)) for i, v in enumerate(chunk)))
        conn.execute("COMMIT")
        dim = data.shape[1]
        exact = lambda ids: store.vectors_by_id(conn, ids, dim)
        if "sqlite" in wanted:
            sources["sqlite"] = {"fetch": exact}
    if "memmap" in wanted:
        path = folder / "vectors.f16"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=data.shape)
        mm[:] = data
        mm.flush()
        del mm
        mm = np.load(path, mmap_mode="r")
        sources["memmap"] = {"fetch": lambda ids: mm[np.asarray(ids)].astype(np.float32)}
    if "product" in wanted:
        path, n = folder / H.PATTERN.format(generation=1), len(data)
        start = time.perf_counter()
        H.write_arrays(path, 1, np.arange(n, dtype=np.int64), data)
        update["write_s"] = round(time.perf_counter() - start, 2)
        half = H.HalfVectors.open(path, 1, dim, n)
        sources["product"] = {"fetch": half.fetch, "final": exact}
        if update_rows:
            rng = np.random.default_rng(1)
            changed = rng.choice(n, update_rows, replace=False)
            added = np.concatenate([changed, np.arange(n, n + update_rows)])
            start = time.perf_counter()
            H.write_patched(folder / H.PATTERN.format(generation=2), 2, half, changed, added, data[added % n])
            update["patch_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            conn.execute("BEGIN")
            ids, vectors = store.all_vectors(conn, dim)
            conn.execute("COMMIT")
            H.write_arrays(folder / H.PATTERN.format(generation=3), 3, ids, vectors)
            update["rebuild_from_sqlite_s"] = round(time.perf_counter() - start, 2)
            update["rows_changed_and_added"] = update_rows
            del ids, vectors
            for g in (2, 3):
                (folder / H.PATTERN.format(generation=g)).unlink()
    return sources, update


def build(ids, data, kind: str, threads: int) -> tuple[faiss.Index, float]:
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = V.build(ids, data, data.shape[1], approximate_threshold=1, index_type=kind)
    return index, round(time.perf_counter() - start, 2)


def run_size(n: int, args, rng: np.random.Generator, folder: Path) -> dict:
    if args.vectors:
        everything = V.as_unit_rows(np.load(args.vectors, mmap_mode="r")[: n + args.queries])
        if len(everything) < n + args.queries:
            raise SystemExit(f"{args.vectors} holds {len(everything)} rows, fewer than {n} + {args.queries} queries")
        data, queries = everything[:n], everything[n:]
        dim = data.shape[1]
    else:
        dim = args.dim
        centres = rng.standard_normal((1000, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        data = random_unit(n, dim, rng, args.data, centres)
        queries = random_unit(args.queries, dim, rng, args.data, centres)
    ids = np.arange(n, dtype=np.int64)

    exact, exact_build = build(ids, data, "flat", args.build_threads)
    indexes, result = {}, {"size": n, "dim": dim, "queries": args.queries,
                           "exact": {"index": "IDMap,Flat (inner product)", "build_s": exact_build,
                                     "bytes_per_vector": bytes_per_vector(exact)}}
    for kind in args.types:
        indexes[kind], seconds = build(ids, data, kind, args.build_threads)
        ivf = V.ivf_of(indexes[kind])
        name = (f"IVF{ivf.nlist},Flat" if kind == "ivf" else f"IVF{ivf.nlist},PQ{ivf.pq.M}x{ivf.pq.nbits}"
                if kind == "ivfpq" else f"IDMap,HNSW{V.HNSW_M},Flat")
        result[kind] = {"index": name, "build_s": seconds, "bytes_per_vector": bytes_per_vector(indexes[kind]),
                        "runs": {}}
        print(json.dumps({"built": kind, **result[kind]}), flush=True)
    sources, update = rerank_sources(data, args.rerank_from, folder, args.update_rows) if "ivfpq" in args.types \
        else ({}, {})
    if update:
        result["rerank_file"] = update
        print(json.dumps({"rerank_file": update}), flush=True)
    faiss.omp_set_num_threads(args.threads)

    configs = []  # (kind, label, search options)
    for kind in args.types:
        if kind == "ivf":
            configs += [(kind, f"nprobe={p}", {"nprobe": p}) for p in args.nprobe]
        elif kind == "hnsw":
            configs += [(kind, f"efSearch={e}", {"ef_search": e}) for e in args.ef_search]
        else:
            for p in args.nprobe:
                configs.append((kind, f"nprobe={p},refine=1", {"nprobe": p, "refine": 1}))
                for r in (r for r in args.refine if r > 1):
                    configs += [(kind, f"nprobe={p},refine={r},from={s}", {"nprobe": p, "refine": r, **f})
                                for s, f in sources.items()]

    truth_scores, truth = V.search(exact, queries, 10)
    single = {"exact": []} | {(kind, label): [] for kind, label, _ in configs}
    found = {(kind, label): [] for kind, label, _ in configs}
    for q in queries:  # single queries, interleaved: exact, then each configuration
        q = q[None, :]
        start = time.perf_counter()
        V.search(exact, q, 10)
        single["exact"].append(time.perf_counter() - start)
        for kind, label, options in configs:
            start = time.perf_counter()
            _, hit = V.search(indexes[kind], q, 10, **options)
            single[(kind, label)].append(time.perf_counter() - start)
            found[(kind, label)].append(hit[0])
    result["exact"]["single_ms"] = percentiles(single["exact"])
    exact_p50 = result["exact"]["single_ms"]["p50"]
    for kind, label, _ in configs:
        hits = np.stack(found[(kind, label)])
        recall = np.mean([len(set(hits[i]) & set(truth[i])) / 10 for i in range(len(queries))])
        ms = percentiles(single[(kind, label)])
        result[kind]["runs"][label] = {"single_ms": ms, "recall_at_10": round(float(recall), 4),
                                       "top1_agreement": round(float(np.mean(hits[:, 0] == truth[:, 0])), 4),
                                       "speedup_single_p50": round(exact_p50 / max(ms["p50"], 1e-9), 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--types", nargs="+", choices=["ivf", "ivfpq", "hnsw"], default=["ivf", "ivfpq"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, V.DEFAULT_NPROBE])
    parser.add_argument("--refine", type=int, nargs="+", default=[1, 5, V.DEFAULT_REFINE, 20])
    parser.add_argument("--rerank-from", nargs="+", choices=["sqlite", "memmap", "product"],
                        default=["sqlite", "memmap", "product"])
    parser.add_argument("--update-rows", type=int, default=1000,
                        help="with --rerank-from product: time an update of this many changed + added rows (0: not)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, V.DEFAULT_EF_SEARCH])
    parser.add_argument("--data", choices=["uniform", "clustered"], default="clustered")
    parser.add_argument("--vectors", default=None, help=".npy of real embeddings (N + queries, E) instead of --data")
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads for the queries (default 1)")
    parser.add_argument("--build-threads", type=int, default=2, help="FAISS OpenMP threads for building (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="folder for the re-ranking files (default: a temporary one)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    runs = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            folder = Path(tmp, str(n))
            folder.mkdir()
            runs.append(run_size(n, args, rng, folder))
            print(json.dumps(runs[-1]), flush=True)  # one line per size as soon as it is done
    print(json.dumps({"faiss": faiss.__version__, "threads": args.threads, "build_threads": args.build_threads,
                      "data": args.vectors or args.data, "blas_threshold": V.BLAS_THRESHOLD,
                      "load_average": os.getloadavg(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
