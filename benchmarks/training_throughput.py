"""Training throughput of the shipped configs, and the FLOP/s they achieve as a share of this
machine's matmul peak measured in the same run.

    .venv/bin/python benchmarks/training_throughput.py [--config configs/shapes-vlm.yaml] [--steps 20]

References in the same run: a large bf16 and fp32 matrix multiplication (the peak the
training could reach if it were nothing but big matmuls), and for the vlm task the same
steps taken the way training took them before packed attention (models/packed_attention.py):
the dense (B, T, T) mask over the padded rows, the frozen vision tower run on every batch,
and the logits of every position (not only of those that predict a trained token). The two
kinds of step alternate, on the same batches. The FLOPs of one training step
(forward + backward) are counted with torch.utils.flop_counter on a real batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from multimodal_models.shapes.generate import ShapesConfig, generate
from multimodal_models.training.config import load_config
from multimodal_models.training.loop import autocast_context, build_task, make_optimizer


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes-vlm.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        generate(ShapesConfig(train=600, val=50, test=0, test_compositional=0), data, progress=False)
        config = load_config(args.config, [f"data.root={data}", "task_options.generate=null", f"output={tmp}/run"])
        task = build_task(config, progress=False)
        model = task.model.train()
        optimizer = make_optimizer(model, config.train)
        t = config.train
        device = torch.device("cpu")

        packed_steps = config.task in ("vlm", "shapes-vlm")  # which have the reference below
        if packed_steps:
            frozen_features = task.frozen_features
            frozen_features([0])  # the frozen tower's features of every training image, once, before counting

        def step(i: int, count_flops: bool = False, reference: bool = False) -> tuple[int, float]:
            if packed_steps:  # the reference: the tower on every batch, no segments (the dense mask), all logits
                task.frozen_features = (lambda images: None) if reference else frozen_features
            indices = random.Random(i).sample(range(len(task)), t.batch_size)
            batch = task.make_batch(indices, random.Random(i))
            if reference:
                batch.pop("segments", None)
            counter = FlopCounterMode(display=False) if count_flops else None
            with counter if counter else contextlib.nullcontext():
                with autocast_context(t.precision, device):
                    loss = task.loss(model, batch, targets_only=False) if reference else task.loss(model, batch)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return batch.get("examples", t.batch_size), counter.get_total_flops() if counter else 0.0

        flops = step(0, count_flops=True)[1]
        reference_flops = step(0, count_flops=True, reference=True)[1] if packed_steps else None
        for i in range(1, 3):  # warm-up
            step(i)
            if packed_steps:
                step(i, reference=True)
        seconds, reference_seconds, total_examples = 0.0, 0.0, 0
        for i in range(3, 3 + args.steps):
            start = time.perf_counter()
            total_examples += step(i)[0]
            seconds += time.perf_counter() - start
            if packed_steps:
                start = time.perf_counter()
                step(i, reference=True)
                reference_seconds += time.perf_counter() - start
        seconds /= args.steps
        reference_seconds /= args.steps
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    achieved = flops / seconds
    peak = peak_bf16 if t.precision == "bf16" else peak_fp32
    report = {
        "config": args.config, "precision": t.precision, "threads": args.threads, "batch_size": t.batch_size,
        "seconds_per_step": round(seconds, 3), "images_per_s": round(t.batch_size / seconds, 1),
        "examples_per_s": round(total_examples / args.steps / seconds, 1),
        "gflop_per_step": round(flops / 1e9, 1), "achieved_gflop_s": round(achieved / 1e9, 1),
        "matmul_peak_gflop_s": {"bf16": round(peak_bf16 / 1e9, 1), "fp32": round(peak_fp32 / 1e9, 1)},
        "share_of_peak": round(achieved / peak, 3),
    }
    if packed_steps:
        report["reference_dense_mask_and_tower_every_batch"] = {
            "seconds_per_step": round(reference_seconds, 3), "gflop_per_step": round(reference_flops / 1e9, 1),
            "achieved_gflop_s": round(reference_flops / reference_seconds / 1e9, 1)}
        report["speedup"] = round(reference_seconds / seconds, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
