"""One training loop for every task.

AdamW with warm-up and cosine decay, gradient clipping and accumulation, bf16 autocast
(fp16 with loss scaling on CUDA), evaluation every N steps with the official metrics,
atomic checkpoints (model, optimizer, scheduler, RNG, step) of the last and the best
state, `--resume` that continues to the same result as an uninterrupted run, a progress
bar, a JSONL log and PNG curves. Under `torchrun` it runs data-parallel (DDP).

A task (vlm_task.VLMTask, tasks.ContrastiveTask, tasks.VQATask, or one that the registry names,
such as the Shapes world's) supplies the model, the batches, the loss and the evaluation; the
loop knows nothing else about it.

Determinism: the examples of step s are a function of (seed, s) and so is every random
choice a task makes when building a batch, so resuming at step s replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import registry
from ..devices import resolve_device
from ..data.splits import load_split
from ..evaluate.harness import headline
from ..models.pretrained import atomic_directory
from .callbacks import Callback, Callbacks, TensorBoardLogger, tensorboard_available
from .config import RunConfig, dump_config
from .plots import training_curves

STATE_NAME = "training_state.pt"


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def device(self, requested: str = "auto") -> torch.device:
        """The device this process trains on: `requested` (train.device), where under torchrun
        a CUDA process takes the GPU of its LOCAL_RANK."""
        device = resolve_device(requested)
        if device.type == "cuda" and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device


def build_task(config: RunConfig, *, progress: bool = True):
    with collector_paused():
        train_split = load_split(config.data, "train")
        eval_split = load_split(config.data, "eval")
        return registry.task_class(config.task)(config, train_split, eval_split, progress=progress)


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off while a task reads its data. Reading builds a million
    small objects (annotations, records, token lists), none of them garbage, and the collector would
    walk them all again every few hundred thousand allocations: the Shapes recipe's task was built
    in 19 s with it and 12 s without."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ExampleOrder:
    """Which examples step s trains on: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.size, generator=generator)}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """Global example numbers start..start+count-1 mapped to dataset indices."""
        out = []
        for g in range(start, start + count):
            out.append(int(self._permutation(g // self.size)[g % self.size]))
        return out


def to_device(value, device: torch.device):
    """A batch entry on the device: tensors, and tuples of tensors (named ones keep their type)."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple) and value and all(torch.is_tensor(v) for v in value):
        moved = [v.to(device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices only (not norms, biases, embeddings of positions)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and "position" not in name else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("fp16 training needs CUDA; use precision: bf16 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model, optimizer, scheduler, scaler, step: int, best: float | None,
                    metrics: dict | None = None) -> None:
    """Model files + training_state.pt, swapped in atomically."""
    with atomic_directory(directory) as tmp:
        model.write_files(tmp)
        torch.save({"step": step, "best": best, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": rng_state()}, tmp / STATE_NAME)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


class JsonlLog:
    def __init__(self, path: Path, *, keep_until_step: int | None):
        self.path = path
        if keep_until_step is not None and path.exists():  # resuming: forget what came after the checkpoint
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(config: RunConfig, *, resume: bool = False, progress: bool = True,
          callbacks: list[Callback] | tuple = ()) -> dict:
    """Run (or resume) a training run; returns a summary: output, steps_done, best (the
    task's primary metric), model (the exported folder, once all steps are done), final_eval.
    `callbacks` (training/callbacks.py) see the logs, evaluations and checkpoints as they come."""
    dist = Distributed.from_environment()
    device = dist.device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    out = Path(config.output)
    last_dir, best_dir = out / "checkpoints" / "last", out / "checkpoints" / "best"
    if dist.is_main:
        if not resume and last_dir.exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another output")
        if resume and not (last_dir / STATE_NAME).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {last_dir}")
        registry.task_class(config.task).prepare_data(config)  # e.g. generate a synthetic data set
    dist.barrier()
    random.seed(config.train.seed)
    np.random.seed(config.train.seed)
    torch.manual_seed(config.train.seed)
    task = build_task(config, progress=progress and dist.is_main)
    model = task.model.to(device)
    optimizer = make_optimizer(model, config.train)
    t = config.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.steps, t.warmup, t.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    start, best = 0, None
    if resume:
        model.load_weights(last_dir / "model.safetensors", map_location=str(device))
        state = torch.load(last_dir / STATE_NAME, map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, best = state["step"], state["best"]
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config))
    log = JsonlLog(out / "log.jsonl", keep_until_step=start if resume else None) if dist.is_main else None
    hooks = Callbacks(list(callbacks) + _tensorboard(config, out)) if dist.is_main else Callbacks()
    hooks.on_train_begin(config, start)
    runner = model
    if dist.world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        runner = torch.compile(runner)
    order = ExampleOrder(len(task), t.seed)
    micro_batch = t.batch_size // t.accumulate
    if micro_batch % dist.world:
        raise ValueError(f"batch_size / accumulate = {micro_batch} must be divisible by the {dist.world} processes")
    bar = tqdm(total=t.steps, initial=start, desc=f"train {config.task}", disable=not (progress and dist.is_main),
               dynamic_ncols=True)
    window = {"loss": 0.0, "examples": 0, "images": 0, "tokens": 0, "steps": 0, "time": time.perf_counter()}
    trained_this_run = 0
    final_eval: dict | None = None
    step = start
    for step in range(start, t.steps):
        model.train()
        step_loss = 0.0
        for micro in range(t.accumulate):
            indices = order.take((step * t.accumulate + micro) * micro_batch, micro_batch)[dist.rank::dist.world]
            batch = task.make_batch(indices, random.Random(f"{t.seed}/{step}/{micro}/{dist.rank}"))
            batch = {k: to_device(v, device) for k, v in batch.items()}
            sync = contextlib.nullcontext() if dist.world == 1 or micro == t.accumulate - 1 else runner.no_sync()
            with sync:
                with autocast_context(t.precision, device):
                    loss = task.loss(runner, batch) / t.accumulate
                (scaler.scale(loss) if scaler else loss).backward()
            step_loss += float(loss.detach())
            window["examples"] += batch.get("examples", micro_batch) * dist.world
            window["tokens"] += batch.get("tokens", 0) * dist.world
            window["images"] += batch.get("images", 0) * dist.world
        if scaler:
            scaler.unscale_(optimizer)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"the loss became {step_loss} at step {step + 1}; lower train.lr or use fp32")
        window["loss"] += step_loss
        window["steps"] += 1
        trained_this_run += 1
        done = step + 1
        bar.update(1)
        if dist.is_main and (done % t.log_every == 0 or done == t.steps):
            elapsed = time.perf_counter() - window["time"]
            record = {"step": done, "loss": round(window["loss"] / window["steps"], 5),
                      "lr": scheduler.get_last_lr()[0], "examples_per_s": round(window["examples"] / elapsed, 2),
                      "tokens_per_s": round(window["tokens"] / elapsed, 1)}
            if window["images"]:  # a task whose examples share images (VQA grouped by image) says how many
                record["images_per_s"] = round(window["images"] / elapsed, 2)
            log.write(record)
            hooks.on_log(done, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_s']:.0f}")
            window = {"loss": 0.0, "examples": 0, "images": 0, "tokens": 0, "steps": 0, "time": time.perf_counter()}
        evaluate_now = done % t.eval_every == 0 or done == t.steps
        stopping = t.stop_after is not None and trained_this_run >= t.stop_after
        if evaluate_now and dist.is_main:
            final_eval = _evaluate(task, model, t.eval_samples)
            flat = headline(final_eval)
            log.write({"step": done, "eval": flat})
            hooks.on_evaluate(done, flat)
            score = task.primary_metric(flat)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.2f}" for k, v in flat.items() if "/" not in k and v is not None))
            if best is None or score > best:
                best = score
                save_checkpoint(best_dir, model, optimizer, scheduler, scaler, done, best, _strip(final_eval))
                hooks.on_save(done, best_dir)
        if dist.is_main and (evaluate_now or done % t.save_every == 0 or stopping):
            save_checkpoint(last_dir, model, optimizer, scheduler, scaler, done, best)
            hooks.on_save(done, last_dir)
        dist.barrier()
        if stopping and done < t.steps:
            break
    bar.close()
    summary = {"output": str(out), "steps_done": step + 1 if t.steps else 0, "best": best}
    if dist.is_main:
        _plot(out)
        if step + 1 >= t.steps:
            _export(out, task, best_dir if best_dir.exists() else last_dir, config.save_dtype)
            summary["model"] = str(out / "model")
        if final_eval is not None:
            summary["final_eval"] = _strip(final_eval)
    hooks.on_train_end(summary)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return summary


def _tensorboard(config: RunConfig, out: Path) -> list[Callback]:
    """The TensorBoard logger train.tensorboard asks for (None: when the package is installed)."""
    wanted = config.train.tensorboard
    if wanted is False or (wanted is None and not tensorboard_available()):
        return []
    return [TensorBoardLogger(out / "tensorboard")]


def _evaluate(task, model, limit: int) -> dict:
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, limit)
    finally:
        model.train(was_training)


def _strip(results: dict) -> dict:
    """Evaluation results without the (large) per-item predictions."""
    if not isinstance(results, dict):
        return results
    return {k: _strip(v) for k, v in results.items() if k not in ("predictions", "perQuestion", "correct")}


def _export(out: Path, task, checkpoint: Path, dtype_name: str) -> None:
    """The final model folder: the best checkpoint's weights in the configured dtype."""
    model = task.model
    model.load_weights(checkpoint / "model.safetensors", map_location=str(model.device))
    if hasattr(task, "export_model"):
        model = task.export_model(model)
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    model.save_pretrained(out / "model", dtype=dtype)


def _plot(out: Path) -> None:
    training_curves(out / "log.jsonl", out / "curves.png")
