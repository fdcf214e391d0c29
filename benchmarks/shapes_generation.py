"""How long the Shapes benchmark takes to generate (target: 10,000 training images with all
annotations in at most 60 s on 2 cores).

    .venv/bin/python benchmarks/shapes_generation.py [--train 10000] [--workers 2]

Reference in the same run: the same images with one worker, which shows how the work
scales with processes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from multimodal_models.shapes.generate import ShapesConfig, generate


def timed(config: ShapesConfig, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        generate(config, out, workers=workers, progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-reference", action="store_true", help="do not time the one-worker reference")
    args = parser.parse_args()
    config = ShapesConfig(train=args.train, val=0, test=0, test_compositional=0)
    result = {"train_images": args.train, "cpu_count": os.cpu_count(), "workers": args.workers}
    result["seconds"] = round(timed(config, args.workers), 2)
    result["images_per_second"] = round(args.train / result["seconds"], 1)
    if not args.skip_reference and args.workers > 1:
        result["one_worker_seconds"] = round(timed(config, 1), 2)
        result["speedup"] = round(result["one_worker_seconds"] / result["seconds"], 2)
    result["within_60s_target"] = result["seconds"] <= 60
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
