"""Training configuration: one YAML file per experiment, read into dataclasses.

    task: vlm                   # contrastive | vqa | vlm | shapes-contrastive | shapes-vlm (registry.TASKS)
    data: {...}                 # DataConfig: a dataset folder or explicit files per split
    model: {...}                # the model's own config (VLMConfig, DualEncoderConfig, ...)
    train: {...}                # OptimConfig: steps, batch size, schedule, precision, evaluation
    output: runs/shapes-vlm     # where checkpoints, logs and curves go

Command-line overrides use dotted keys: `train.steps=200 model.decoder.depth=2`; values are
parsed as YAML (numbers, booleans, lists). Every value is checked against its field's type
when the file is read, task_options too (each task declares them as a dataclass, `Options`):
an unknown key or a value of the wrong type is an error naming it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import registry
from ..data.splits import DataConfig, SplitFiles  # noqa: F401  (SplitFiles: part of a run's config)
from ..errors import DataFormatError
from ..models.pretrained import config_from_dict


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch (all processes, all accumulation steps together)
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # the cosine schedule ends at lr * min_lr_ratio
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.05  # on matrices only, not on norms, biases, embeddings of positions
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "bf16"  # "fp32" | "bf16" (autocast; on CPU and CUDA) | "fp16" (CUDA only)
    seed: int = 0
    threads: int | None = None  # torch threads per process (None: leave torch's default)
    log_every: int = 10
    eval_every: int = 500
    eval_samples: int = 300  # evaluation images per run of the evaluation (0: all)
    save_every: int = 500
    stop_after: int | None = None  # end this run after so many steps (time-boxed runs; --resume continues)
    compile: bool = False  # torch.compile the model
    tensorboard: bool | None = None  # TensorBoard logs in OUTPUT/tensorboard: None when it is installed, True needs it
    device: str = "auto"  # cpu | cuda | cuda:N | mps | auto (under torchrun, CUDA processes take their LOCAL_RANK's GPU)


@dataclass
class RunConfig:
    task: str
    data: DataConfig
    model: dict
    train: OptimConfig = field(default_factory=OptimConfig)
    output: str = "runs/run"
    tokenizer: dict = field(default_factory=dict)  # settings of the word tokenizer built from the training text
    task_options: Any = None  # the task's own settings: its Options dataclass (see each task)
    save_dtype: str = "float32"  # dtype of the exported weights: float32 | float16 | bfloat16

    def to_dict(self) -> dict:
        return asdict(self)


def task_options(config: RunConfig, options_class: type):
    """A run's task options as the task's Options dataclass: as read (load_config), or built from a
    mapping or from nothing (a RunConfig made in code)."""
    value = config.task_options
    if value is None:
        return options_class()
    if isinstance(value, options_class):
        return value
    return config_from_dict(options_class, value, source="task_options")


def parse_overrides(pairs: list[str]) -> dict:
    """['train.steps=200', 'model.decoder.depth=2'] -> nested dict."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value (e.g. train.steps=200)")
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return out


def merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A YAML config with command-line overrides (["train.steps=200", ...])."""
    return as_config(path, parse_overrides(overrides or []))


def as_config(config: RunConfig | dict | str | Path, overrides: dict | None = None) -> RunConfig:
    """A run's config from a YAML file, a dict of the YAML's shape or a RunConfig, with
    `overrides` merged in: {"train": {"steps": 200}}, or flat keys with "." or "__" between
    levels ({"train.steps": 200}, {"train__steps": 200})."""
    nested: dict = {}
    for key, value in (overrides or {}).items():
        nested = merge(nested, _nest(key.replace("__", ".").split("."), value))
    if isinstance(config, RunConfig):
        raw, source = config.to_dict(), "config"
    elif isinstance(config, dict):
        raw, source = copy.deepcopy(config), "config"
    elif isinstance(config, (str, Path)):
        path = Path(config)
        try:
            raw, source = yaml.safe_load(path.read_text()) or {}, str(path)
        except yaml.YAMLError as exc:
            raise DataFormatError(path, f"not valid YAML: {exc}") from None
    else:
        raise TypeError(f"config: expected a YAML path, a dict or a RunConfig, got {type(config).__name__}")
    return config_from_raw(merge(raw, nested), source=source)


def _nest(parts: list[str], value) -> dict:
    return {parts[0]: _nest(parts[1:], value) if len(parts) > 1 else value}


def config_from_raw(raw: dict, *, source: str = "config") -> RunConfig:
    for key in ("task", "data"):
        if key not in raw:
            raise DataFormatError(source, f"missing '{key}'", field=key)
    if raw["task"] not in registry.TASKS:
        raise DataFormatError(source, f"unknown task {raw['task']!r}; expected one of {list(registry.TASKS)}",
                              field="task")
    task_class = registry.task_class(raw["task"])
    chooses = getattr(task_class, "chooses_from_data", False)  # e.g. the vqa task: a recipe for the data
    if "model" not in raw and not chooses:
        raise DataFormatError(source, "missing 'model'", field="model")
    options = raw.get("task_options") or {}
    config: RunConfig = config_from_dict(RunConfig, {"model": {}, **raw, "task_options": None}, source=source)
    # the train settings the file gives: a task that chooses a recipe from the data fills in the others
    config.given_train = frozenset(raw.get("train") or {})
    config.task_options = config_from_dict(task_class.Options, options,
                                           source=f"{source}: task_options")
    if config.save_dtype not in ("float32", "float16", "bfloat16"):
        raise DataFormatError(source, f"save_dtype must be float32, float16 or bfloat16, got {config.save_dtype!r}")
    if config.train.tensorboard not in (None, True, False):
        raise DataFormatError(source, f"train.tensorboard must be true, false or null (when installed), got "
                                      f"{config.train.tensorboard!r}")
    if not _is_device_name(config.train.device):
        raise DataFormatError(source, f"train.device must be cpu, cuda, cuda:N, mps or auto, got {config.train.device!r}")
    if config.train.precision not in ("fp32", "bf16", "fp16"):
        raise DataFormatError(source, f"train.precision must be fp32, bf16 or fp16, got {config.train.precision!r}")
    if config.train.batch_size % config.train.accumulate:
        raise DataFormatError(source, "train.batch_size must be a multiple of train.accumulate")
    return config


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(_plain(config.to_dict()), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_device_name(name) -> bool:
    """A device name `--device` takes (whether this machine has it is checked when training starts)."""
    kind, _, index = str(name).partition(":")
    return kind in ("cpu", "mps", "auto") and not index or kind == "cuda" and (not index or index.isdigit())
