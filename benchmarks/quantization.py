"""A ViT-B/32-shaped CLIP: image and text embedding in float32, int8 and ONNX Runtime, against transformers.

    .venv/bin/python benchmarks/quantization.py [--images 8] [--texts 32] [--repeats 5] [--threads 1 2]

The checkpoint is benchmarks/pretrained_clip.py's (the real ViT-B/32 sizes, random weights). For
each thread count, in one process and interleaved: transformers' CLIPModel in float32 (the
reference), ours in float32, ours with `quantize="int8"` (torch.ao dynamic int8), and ours
exported to ONNX (`multimodal export --format onnx`) run by ONNX Runtime in float32 and in int8.
Times are medians per batch; `speedup` is transformers' time over each one's (> 1: faster);
`cosine_min` is the smallest cosine between each one's embeddings and ours in float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pretrained_clip import make_checkpoint  # noqa: E402  (benchmarks/ is the script's folder)


def measure(runs: dict, repeats: int) -> tuple[dict, dict]:
    outputs, timings = {}, {name: [] for name in runs}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up
            outputs[name] = run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
    return outputs, {name: statistics.median(times) for name, times in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per batch")
    parser.add_argument("--texts", type=int, default=32, help="texts per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import transformers

    import multimodal_models
    from multimodal_models.export.onnx import OnnxTowers, export_onnx
    from multimodal_models.models.inputs import tokenize
    from multimodal_models.models.quantize import quantize

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_checkpoint(folder / "hf")
        ours = multimodal_models.load(folder / "hf")
        theirs = transformers.CLIPModel.from_pretrained(folder / "hf").eval()
        int8 = quantize(copy.deepcopy(ours))
        start = time.perf_counter()
        export_onnx(ours, folder / "onnx")
        export_s = time.perf_counter() - start
        export_onnx(ours, folder / "onnx-int8", quantize="int8")

        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (rng.integers(200, 400), rng.integers(200, 400), 3),
                                               dtype=np.uint8)) for _ in range(args.images)]
        pixels = ours.image_processor(images)
        words = "a photo of the cat dog on grass in a red car".split()
        texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(args.texts)]
        ids, mask = tokenize(ours.tokenizer, texts, ours.config.text.max_length)

        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            onnx, onnx_int8 = OnnxTowers(folder / "onnx", threads=threads), OnnxTowers(folder / "onnx-int8", threads=threads)
            variants = {"transformers_fp32": None, "ours_fp32": ours, "ours_int8": int8, "onnx_fp32": onnx,
                        "onnx_int8": onnx_int8}
            runs = {}
            for name, model in variants.items():
                if model is None:
                    runs[(name, "image")] = lambda: F.normalize(
                        theirs.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
                    runs[(name, "text")] = lambda: F.normalize(
                        theirs.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
                else:
                    runs[(name, "image")] = lambda m=model: m.encode_image(pixels)
                    runs[(name, "text")] = lambda m=model: m.encode_text(ids, mask)
            outputs, median = measure(runs, args.repeats)
            for name in variants:
                row = {"threads": threads, "variant": name}
                for kind in ("image", "text"):
                    row[f"{kind}_ms"] = round(1000 * median[(name, kind)], 1)
                    row[f"{kind}_speedup"] = round(median[("transformers_fp32", kind)] / median[(name, kind)], 2)
                    row[f"{kind}_cosine_min"] = round(float(F.cosine_similarity(
                        outputs[(name, kind)].float(), outputs[("ours_fp32", kind)]).min()), 5)
                rows.append(row)
        sizes = {name: round(sum(p.stat().st_size for p in (folder / name / "onnx").glob("*.onnx")) / 2**20, 1)
                 for name in ("onnx", "onnx-int8")}

    print(json.dumps({
        "model": "CLIP ViT-B/32 shape, random weights",
        "parameters_millions": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "images_per_batch": args.images, "texts_per_batch": args.texts, "text_tokens": list(ids.shape),
        "repeats": args.repeats, "onnx_export_s": round(export_s, 1), "onnx_file_mib": sizes,
        "rows": rows, "torch": torch.__version__, "transformers": transformers.__version__,
    }, indent=2))
    print("\nthreads  variant            image ms  speedup  cos      text ms  speedup  cos")
    for r in rows:
        print(f"{r['threads']:>7}  {r['variant']:<17}  {r['image_ms']:>8}  {r['image_speedup']:>6}x  "
              f"{r['image_cosine_min']:.5f}  {r['text_ms']:>7}  {r['text_speedup']:>6}x  {r['text_cosine_min']:.5f}")


if __name__ == "__main__":
    main()
