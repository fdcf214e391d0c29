"""Search latency and recall of the image index: exact (flat) and approximate (IVF) side by side.

    .venv/bin/python benchmarks/index_search.py [--sizes 10000 100000 1000000] [--dim 256]
        [--queries 200] [--nprobe 8 32 128] [--data uniform|clustered] [--threads 1]

For each collection size, both indexes are built by `multimodal_models.index.vectors`
(what `multimodal index` ships) over the same random unit vectors, and the same queries
are run through both in the same process, interleaved query by query:

- `single_ms`: p50 / p95 latency of one query at a time (k=10);
- `batch_ms_per_query`: all queries in one call, divided by their number;
- `recall_at_10`: the share of the exact top 10 that the approximate top 10 finds (IVF,
  per nprobe); `top1_agreement`: how often both agree on the best hit.

`uniform` data (unit vectors uniform on the sphere, the default) is the hard case for any
approximate index: no clusters, neighbours barely closer than strangers. `clustered`
data (a mixture of 1000 Gaussian blobs on the sphere) is closer to real embeddings.
The reference is the exact index; `speedup` is exact p50 / approximate p50.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from multimodal_models.index import vectors as V


def random_unit(n: int, dim: int, rng: np.random.Generator, kind: str, centres: np.ndarray | None) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: 1M x 256 float64 normals would take 2 GB at once
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


def run_size(n: int, args, rng: np.random.Generator) -> dict:
    centres = rng.standard_normal((1000, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = random_unit(n, args.dim, rng, args.data, centres)
    queries = random_unit(args.queries, args.dim, rng, args.data, centres)
    ids = np.arange(n, dtype=np.int64)

    start = time.perf_counter()
    exact = V.build(ids, data, args.dim, approximate_threshold=n + 1)
    exact_build = time.perf_counter() - start
    start = time.perf_counter()
    approx = V.build(ids, data, args.dim, approximate_threshold=1)
    approx_build = time.perf_counter() - start
    nlist = faiss.extract_index_ivf(approx).nlist

    truth_scores, truth = V.search(exact, queries, 10)
    result = {"size": n, "dim": args.dim, "queries": args.queries,
              "exact": {"index": "IDMap,Flat (inner product)", "build_s": round(exact_build, 2)},
              "approximate": {"index": f"IVF{nlist},Flat (inner product, spherical k-means)",
                              "build_s": round(approx_build, 2), "by_nprobe": {}}}

    # single queries, interleaved: exact, then each nprobe, per query
    single = {"exact": []} | {p: [] for p in args.nprobe}
    for q in queries:
        q = q[None, :]
        start = time.perf_counter()
        V.search(exact, q, 10)
        single["exact"].append(time.perf_counter() - start)
        for p in args.nprobe:
            start = time.perf_counter()
            V.search(approx, q, 10, nprobe=p)
            single[p].append(time.perf_counter() - start)
    # the whole batch at once, interleaved too
    batch = {"exact": []} | {p: [] for p in args.nprobe}
    found = {}
    for _ in range(args.batch_repeats):
        start = time.perf_counter()
        V.search(exact, queries, 10)
        batch["exact"].append(time.perf_counter() - start)
        for p in args.nprobe:
            start = time.perf_counter()
            _, found[p] = V.search(approx, queries, 10, nprobe=p)
            batch[p].append(time.perf_counter() - start)

    result["exact"]["single_ms"] = percentiles(single["exact"])
    result["exact"]["batch_ms_per_query"] = round(min(batch["exact"]) * 1000 / args.queries, 4)
    exact_p50 = result["exact"]["single_ms"]["p50"]
    for p in args.nprobe:
        recall = np.mean([len(set(found[p][i]) & set(truth[i])) / 10 for i in range(args.queries)])
        top1 = np.mean(found[p][:, 0] == truth[:, 0])
        single_ms = percentiles(single[p])
        result["approximate"]["by_nprobe"][str(p)] = {
            "single_ms": single_ms,
            "batch_ms_per_query": round(min(batch[p]) * 1000 / args.queries, 4),
            "recall_at_10": round(float(recall), 4),
            "top1_agreement": round(float(top1), 4),
            "speedup_single_p50": round(exact_p50 / max(single_ms["p50"], 1e-9), 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, V.DEFAULT_NPROBE, 128])
    parser.add_argument("--data", choices=["uniform", "clustered"], default="uniform")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed repeats of the batched search (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    runs = []
    for n in args.sizes:
        runs.append(run_size(n, args, rng))
        print(json.dumps(runs[-1]), flush=True)  # one line per size as soon as it is done
    print(json.dumps({"faiss": faiss.__version__, "threads": args.threads, "data": args.data,
                      "blas_threshold": V.BLAS_THRESHOLD, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
