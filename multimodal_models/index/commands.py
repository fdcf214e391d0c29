"""What `multimodal index` and `multimodal search` do (their options are defined in `cli.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MultimodalError
from ..loading import DEFAULT_DUAL_ENCODER, SHIPPED, load
from .image_index import DEFAULT_INDEX_DIRNAME, ImageIndex, ShardedIndex
from .rerank import Reranker
from .vectors import DEFAULT_NPROBE, DEFAULT_REFINE


def _model_name(name: str) -> str:
    """How the index records a model: a shipped name as is, a folder as an absolute path
    (so `multimodal search` finds it from any working directory)."""
    return name if name in SHIPPED else str(Path(name).expanduser().resolve())


def _embedder(name: str, args, index: ImageIndex):
    """The dual encoder, as the index's vectors were embedded: --dtype and --quantize default to the
    index's own (an index built in bfloat16 or int8 is searched so: the weights, and so the model's
    fingerprint, are those); --runtime onnx computes the same embeddings with ONNX Runtime."""
    quantize = args.quantize or (index.info.get("model_quantize") if args.runtime == "torch" else None)
    return load(name, expect="dual_encoder", device=args.device, dtype=args.dtype or index.info.get("model_dtype"),
                quantize=quantize, runtime=args.runtime)


def run_index(args) -> None:
    if not args.folder.is_dir():
        raise FileNotFoundError(f"{args.folder} is not a folder")
    with ImageIndex.open(args.out or args.folder / DEFAULT_INDEX_DIRNAME, create=True) as index:
        name = args.model or index.info.get("model_name") or DEFAULT_DUAL_ENCODER
        model = _embedder(name, args, index)
        captioner = load(args.caption_model, expect="vlm", device=args.device, dtype=args.dtype) if args.caption else None
        report = index.update(args.folder, model, model_name=_model_name(name), batch_size=args.batch_size,
                              captioner=captioner,
                              captioner_name=_model_name(args.caption_model) if captioner is not None else None,
                              approximate_threshold=args.approx_threshold, index_type=args.index_type,
                              compressed_threshold=args.compressed_threshold, progress=not args.quiet)
    for path, error in report.rejected:
        print(f"multimodal: not indexed: {path}: {error}", file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))


def run_search(args) -> None:
    if args.query is None and args.image is None:
        raise MultimodalError('give a text query, --image IMG, or both: multimodal search INDEX "a red circle"')
    if args.k < 1:
        raise MultimodalError(f"-k must be at least 1, got {args.k}")
    nprobe = DEFAULT_NPROBE if args.nprobe is None else args.nprobe
    refine = DEFAULT_REFINE if args.refine is None else args.refine
    shards = getattr(args, "shard", None) or []
    if shards:
        if args.rerank_with:
            raise MultimodalError("--rerank-with does not take --shard yet: search one index")
        with ShardedIndex.open([args.index, *shards], nprobe=nprobe, refine=refine) as sharded:
            name = args.model or sharded.shards[0].info.get("model_name")
            if name is None:
                raise MultimodalError(f"the index {sharded.shards[0].path} is empty: no model has indexed anything yet")
            model = _embedder(name, args, sharded.shards[0])
            found = sharded.search(model, text=args.query, image=str(args.image) if args.image else None, k=args.k)
            roots = [shard.root for shard in sharded.shards]
        hits = [hit for _, hit in found]
        files = [str(roots[shard] / hit.path) if roots[shard] else hit.path for shard, hit in found]
    else:
        with ImageIndex.open(args.index, nprobe=nprobe, refine=refine) as index:
            name = args.model or index.info.get("model_name")
            if name is None:
                raise MultimodalError(f"the index {index.path} is empty: no model has indexed anything yet")
            model = _embedder(name, args, index)
            if args.rerank_with:
                if args.query is None or args.image is not None:
                    raise MultimodalError("--rerank-with reranks text queries: give a text query and no --image")
                reranker = Reranker(load(args.rerank_with, expect="vlm", device=args.device, dtype=args.dtype),
                                    top=args.rerank_top, similarity_weight=args.rerank_similarity_weight)
                hits = reranker.search(index, model, args.query, k=args.k)
            else:
                hits = index.search(model, text=args.query, image=str(args.image) if args.image else None, k=args.k)
            root = index.root
        files = [str(root / hit.path) if root else hit.path for hit in hits]
    for rank, (hit, file) in enumerate(zip(hits, files), 1):
        if args.json:
            print(json.dumps({"rank": rank, "path": hit.path, "score": round(hit.score, 6), "file": file,
                              "caption": hit.caption}, ensure_ascii=False))
        else:
            print(f"{hit.score:.4f}\t{file}" + (f"\t{hit.caption}" if hit.caption else ""))
