"""Training throughput of the shipped configs, and the FLOP/s they achieve as a share of this
machine's matmul peak measured in the same run; with --vqa, the questions/s and images/s of
the generic VQA recipes, grouped by image against one question at a time.

    .venv/bin/python benchmarks/training_throughput.py [--config configs/shapes-vlm.yaml] [--steps 20]
    .venv/bin/python benchmarks/training_throughput.py --vqa [--steps 10] [--json vqa.json]

Shipped configs. References in the same run: a large bf16 and fp32 matrix multiplication
(the peak the training could reach if it were nothing but big matmuls), and for the vlm task
the same steps taken the way training took them before packed attention
(models/packed_attention.py): the dense (B, T, T) mask over the padded rows, the frozen vision
tower run on every batch, and the logits of every position (not only of those that predict a
trained token). The two kinds of step alternate, on the same batches. The FLOPs of one
training step (forward + backward) are counted with torch.utils.flop_counter on a real batch.

--vqa: for each generic recipe of the fusion classifier (`RECIPES`: the fusion experiment's
CNN encoder with each fusion, and its ViT middle fusion as configured before the CNN) two
kinds of step alternate on the same batches of `--batch-images` training images:

  per_question  the reference, the step as the vqa task took it before: each question an
                example with its own copy of its image (task_options.group_by_image: false),
                under bf16 autocast (train.precision's default);
  grouped       the step now: each image encoded once for all its questions (group_by_image:
                true, image_index), in fp32 (faster than bf16 for these small models on the CPU).

Both take the same questions per step: every question of those images (Shapes writes 12; a
config's task_options.questions_per_image is set aside). A step is timed from building its batch to the optimizer's update (gradient clipping
included, as in training/loop.py); after --warmup steps of each kind, the median of --steps
timed steps. questions/s = questions per step / median seconds; images/s = distinct images
per step / median seconds (the per-question step encodes every image once per question: its
encoder_images_per_s in the JSON). speed-up = grouped questions/s over per_question's.
--grouped-bf16 adds a third kind (grouped, bf16) to tell grouping's share from precision's.
A run config of the vqa task (--vqa --config X.yaml) is measured instead of the recipes. The
matmul peaks are measured too: they say which machine the figures come from.

The data is a small generated Shapes set in a temporary folder (--images training images),
or a Shapes folder given by --data. The defaults (6 recipes, 32 images and about 384 questions
per step, 2 + 10 steps of each kind) take roughly 5-10 minutes on 2 cores; --recipes picks some.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from multimodal_models.experiments.fusion import MODELS as FUSION_MODELS
from multimodal_models.experiments.questions import split_questions
from multimodal_models import registry
from multimodal_models.models.layers import count_parameters
from multimodal_models.training.tasks import VQATask
from multimodal_models.shapes.generate import ShapesConfig, generate
from multimodal_models.training.config import DataConfig, RunConfig, load_config
from multimodal_models.training.loop import autocast_context, build_task, make_optimizer

CPU = torch.device("cpu")

# The generic VQA recipes: the fusion experiment's classifiers (experiments/fusion.py: one CNN
# encoder, one question encoder, each fusion), and the ViT middle fusion as that experiment had
# it before the CNN (VIT, TEXT), copied here so that this reference stays what it was.
TEXT = {"max_length": 32, "width": 128, "depth": 2, "heads": 4, "causal": False, "pool": "mean"}
VIT = {"image_size": 64, "patch_size": 8, "width": 128, "depth": 3, "heads": 4, "stem": "conv", "pool": "mean",
       "class_token": False}
RECIPES = {f"cnn-{model['fusion']['kind']}": model for task, model in FUSION_MODELS.values() if task == "vqa"}
RECIPES["vit-middle"] = {"encoder": "vit", "vision": VIT, "text": TEXT,  # no coordinates then
                         "fusion": {"kind": "middle", "width": 128, "depth": 3, "heads": 4, "coordinates": False}}
# kind of step -> (group_by_image, precision)
STEP_KINDS = {"per_question": (False, "bf16"), "grouped": (True, "fp32")}
EXTRA_KIND = {"grouped_bf16": (True, "bf16")}


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def matmul_peaks() -> dict:
    return {"bf16": round(matmul_peak(torch.bfloat16) / 1e9, 1), "fp32": round(matmul_peak(torch.float32) / 1e9, 1)}


@contextlib.contextmanager
def shapes_data(args):
    """The Shapes folder to train on: --data, or --images training images generated in a temporary folder."""
    if args.data:
        yield Path(args.data)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        generate(ShapesConfig(train=args.images, val=min(50, args.images), test=0, test_compositional=0), data,
                 workers=args.threads, progress=False)
        yield data


# -- shipped configs ------------------------------------------------------------------------------


def measure_config(args, data: Path, tmp: str) -> dict:
    """The shipped config's training step against its reference and the matmul peak (see the docstring)."""
    config = load_config(args.config, [f"data.root={data}", "task_options.generate=null", f"output={tmp}/run"])
    task = build_task(config, progress=False)
    model = task.model.train()
    optimizer = make_optimizer(model, config.train)
    t = config.train
    steps = args.steps or 20

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
            with autocast_context(t.precision, CPU):
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
    for i in range(3, 3 + steps):
        start = time.perf_counter()
        total_examples += step(i)[0]
        seconds += time.perf_counter() - start
        if packed_steps:
            start = time.perf_counter()
            step(i, reference=True)
            reference_seconds += time.perf_counter() - start
    seconds /= steps
    reference_seconds /= steps
    peaks = matmul_peaks()
    achieved = flops / seconds
    report = {
        "config": args.config, "precision": t.precision, "threads": args.threads, "batch_size": t.batch_size,
        "seconds_per_step": round(seconds, 3), "images_per_s": round(t.batch_size / seconds, 1),
        "examples_per_s": round(total_examples / steps / seconds, 1),
        "gflop_per_step": round(flops / 1e9, 1), "achieved_gflop_s": round(achieved / 1e9, 1),
        "matmul_peak_gflop_s": peaks,
        "share_of_peak": round(achieved / 1e9 / peaks["bf16" if t.precision == "bf16" else "fp32"], 3),
    }
    if packed_steps:
        report["reference_dense_mask_and_tower_every_batch"] = {
            "seconds_per_step": round(reference_seconds, 3), "gflop_per_step": round(reference_flops / 1e9, 1),
            "achieved_gflop_s": round(reference_flops / reference_seconds / 1e9, 1)}
        report["speedup"] = round(reference_seconds / seconds, 2)
    return report


# -- VQA recipes ----------------------------------------------------------------------------------


def vqa_recipes(args, data: Path, tmp: str) -> dict[str, RunConfig]:
    """name -> run config of the vqa task on `data`: the generic recipes, or the one --config gives."""
    def on_data(config: RunConfig) -> RunConfig:
        config.data = DataConfig(root=str(data), train=split_questions(str(data), "train"), eval=split_questions(str(data), "val"),
                                 train_split="train", eval_split="val")
        config.train = dataclasses.replace(config.train, batch_size=args.batch_images, threads=args.threads)
        config.output = f"{tmp}/run"
        return config

    if args.config:
        config = load_config(args.config)
        if not issubclass(registry.task_class(config.task), VQATask):  # vqa, or a task built on it (shapes-vqa)
            raise SystemExit(f"--vqa measures run configs of the vqa task; {args.config} is of the {config.task} task")
        return {Path(args.config).stem: on_data(config)}
    names = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; expected some of {list(RECIPES)}")
    return {name: on_data(RunConfig(task="vqa", data=DataConfig(), model=copy.deepcopy(RECIPES[name])))
            for name in names}


def vqa_batch(task, images: list[int], grouped: bool, rng: random.Random) -> dict:
    """The images' questions as one batch: grouped (each image once, image_index) or one example per
    question with its own copy of the image, built by the task's own make_batch either way."""
    if grouped:
        return task.make_batch(images, rng)
    questions = [q for image in images for q in task.groups[image]]
    task.options.group_by_image = False
    try:
        return task.make_batch(questions, rng)
    finally:
        task.options.group_by_image = True


def vqa_step(task, model, optimizer, images: list[int], grouped: bool, precision: str, seed: int) -> dict:
    """One training step (batch, forward, backward, clipping, update); its seconds and counts."""
    start = time.perf_counter()
    batch = vqa_batch(task, images, grouped, random.Random(seed))
    with autocast_context(precision, CPU):
        loss = task.loss(model, batch)
    loss.backward()
    if task.config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), task.config.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - start, "questions": batch["examples"], "encoded": batch["images"]}


def measure_recipe(config: RunConfig, kinds: dict, args) -> dict:
    """The kinds of step of one recipe, alternating on the same batches: warm-up, then --steps timed."""
    options = dataclasses.asdict(config.task_options) if config.task_options else {}
    config.task_options = {**options, "group_by_image": True, "questions_per_image": None}  # the same questions
    task = build_task(config, progress=False)
    model = task.model.train()
    optimizer = make_optimizer(model, config.train)
    images_per_step = min(args.batch_images, len(task.groups))
    timed: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for i in range(args.warmup + args.steps):
        images = random.Random(i).sample(range(len(task.groups)), images_per_step)
        for kind, (grouped, precision) in kinds.items():
            result = vqa_step(task, model, optimizer, images, grouped, precision, seed=i)
            if i >= args.warmup:
                timed[kind].append(result)
    row = {"parameters": count_parameters(model), "images_per_step": images_per_step}
    for kind, (grouped, precision) in kinds.items():
        row[kind] = summarize(timed[kind], images_per_step, grouped, precision)
    row["speedup"] = round(row["grouped"]["questions_per_s"] / row["per_question"]["questions_per_s"], 2)
    return row


def summarize(results: list[dict], images_per_step: int, grouped: bool, precision: str) -> dict:
    seconds = statistics.median(r["seconds"] for r in results)
    questions = statistics.mean(r["questions"] for r in results)
    encoded = statistics.mean(r["encoded"] for r in results)
    return {"group_by_image": grouped, "precision": precision, "median_seconds_per_step": round(seconds, 4),
            "questions_per_step": round(questions, 1), "questions_per_s": round(questions / seconds, 1),
            "images_per_s": round(images_per_step / seconds, 1), "encoder_images_per_s": round(encoded / seconds, 1)}


def measure_vqa(args, data: Path, tmp: str) -> dict:
    kinds = {**STEP_KINDS, **(EXTRA_KIND if args.grouped_bf16 else {})}
    rows = {}
    for name, config in vqa_recipes(args, data, tmp).items():
        rows[name] = measure_recipe(config, kinds, args)
        print(f"{name}: {rows[name]['speedup']}x", flush=True)
        gc.collect()
    return {"mode": "vqa", "threads": args.threads, "batch_images": args.batch_images, "warmup": args.warmup,
            "timed_steps": args.steps, "data": args.data or f"generated Shapes, {args.images} training images",
            "torch": torch.__version__, "kinds": {k: {"group_by_image": g, "precision": p} for k, (g, p) in kinds.items()},
            "recipes": rows, "matmul_peak_gflop_s": matmul_peaks()}


def vqa_table(report: dict) -> str:
    kinds = list(report["kinds"])
    header = ["recipe", "params", *[f"{k} {unit}" for k in kinds for unit in ("q/s", "img/s", "ms/step")], "speed-up"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in report["recipes"].items():
        cells = [name, f"{row['parameters']:,}"]
        for kind in kinds:
            r = row[kind]
            cells += [str(r["questions_per_s"]), str(r["images_per_s"]), f"{1000 * r['median_seconds_per_step']:.0f}"]
        lines.append("| " + " | ".join(cells + [f"{row['speedup']}x"]) + " |")
    first = next(iter(report["recipes"].values()))
    lines.append(f"\n{first['images_per_step']} images and about {first['per_question']['questions_per_step']:.0f} "
                 f"questions per step; threads: {report['threads']}; median of {report['timed_steps']} timed steps; "
                 f"matmul peak (GFLOP/s) {report['matmul_peak_gflop_s']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run config (default configs/shapes-vlm.yaml; with --vqa: a vqa-task config "
                                         "measured instead of the generic recipes)")
    parser.add_argument("--vqa", action="store_true", help="the VQA recipes: grouped by image against per question")
    parser.add_argument("--recipes", help=f"--vqa: a comma-separated subset of {','.join(RECIPES)}")
    parser.add_argument("--steps", type=int, help="timed steps (of each kind); default 20, with --vqa 10")
    parser.add_argument("--warmup", type=int, default=2, help="--vqa: untimed steps of each kind first")
    parser.add_argument("--batch-images", type=int, default=32, help="--vqa: images per step (with all their questions)")
    parser.add_argument("--grouped-bf16", action="store_true", help="--vqa: also the grouped step under bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", help="a Shapes folder to train on instead of a generated one")
    parser.add_argument("--images", type=int, default=600, help="training images of the generated data")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with shapes_data(args) as data, tempfile.TemporaryDirectory() as scratch:
        if args.vqa:
            args.steps = args.steps or 10
            report = measure_vqa(args, data, scratch)
            print(vqa_table(report))
        else:
            args.config = args.config or "configs/shapes-vlm.yaml"
            report = measure_config(args, data, scratch)
    if args.json:  # before printing: a closed stdout (| head) must not lose it
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
