"""Saving and loading models as folders: config.json + model.safetensors + tokenizer.json +
preprocessor_config.json (the Hugging Face layout, so the folders look like any checkpoint).

Configs are dataclasses (nested for composite models) turned into JSON and back: an
unknown key is an error naming it (a typo never passes silently), a missing key takes
the field's default (so YAML files name only what they change). Loading weights demands
every key and shape to match (no silent `strict=False`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.preprocess import ImageProcessor
from ..data.tokenizer import WordTokenizer
from ..errors import DataFormatError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict, *, source: str = "config") -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields. An unknown key,
    or a value that is not of its field's type (`steps: abc`, `rates: {exist: "a lot"}`), is a
    DataFormatError naming it; lists become tuples where the field is a tuple, ints floats where
    it is a float."""
    if not isinstance(data, dict):
        raise DataFormatError(source, f"expected an object for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DataFormatError(source, f"unknown {cls.__name__} settings {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: typed_value(value, hints[name], f"{source}.{name}") for name, value in data.items()}
    return cls(**values)


def typed_value(value: Any, kind: Any, where: str) -> Any:
    """`value` as type `kind` (a field's type hint), or a DataFormatError naming `where`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any or kind is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error, which names the innermost key
            return typed_value(value, options[0], where)
        for option in options:
            try:
                return typed_value(value, option, where)
            except DataFormatError:
                continue
        raise DataFormatError(where, f"expected {_type_name(kind)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise DataFormatError(where, f"expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(kind):
        if dataclasses.is_dataclass(value) and isinstance(value, kind):
            return value
        return config_from_dict(kind, value, source=where)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            if not args:
                return tuple(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(typed_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(typed_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif kind is list or origin is list:
        if isinstance(value, (list, tuple)):
            return [typed_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif kind is dict or origin is dict:
        if isinstance(value, dict):
            if not args:
                return value
            return {typed_value(k, args[0], f"{where} key"): typed_value(v, args[1], f"{where}.{k}")
                    for k, v in value.items()}
    else:  # a type this checker does not know: taken as it is
        return value
    raise DataFormatError(where, f"expected {_type_name(kind)}, got {value!r}")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def atomic_directory(target: Path):
    """Context manager: yields a temporary folder that replaces `target` when the block succeeds."""

    class _Swap:
        def __enter__(self) -> Path:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(self.tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    return _Swap()


class PretrainedModel(nn.Module):
    """Base class: a model with a dataclass config, a tokenizer and an image processor."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.tokenizer = None  # attached by from_pretrained / the trainer
        self.image_processor = None

    # -- saving --------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write the folder atomically; `dtype` (e.g. torch.float16) shrinks the stored weights."""
        if getattr(self, "quantized", None):
            raise ValueError(f"a model quantized to {self.quantized} is not saved: save the float32 model and "
                             "quantize it when loading (load(..., quantize=...), --quantize)")
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.write_files(tmp, dtype=dtype)
        return directory

    def write_files(self, directory: Path, *, dtype: torch.dtype | None = None) -> None:
        """config.json, model.safetensors, tokenizer.json, preprocessor_config.json into `directory`."""
        config = {"model_type": self.model_type, **config_to_dict(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(self._tensors_to_save(dtype), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save(directory / TOKENIZER_NAME)
        if self.image_processor is not None:
            self.image_processor.save(directory)

    def _tensors_to_save(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[tuple, str] = {}
        for name, tensor in self.state_dict().items():
            storage = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
            if tensor.numel() and storage in seen:  # tied weights are stored once
                continue
            seen[storage] = name
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[name] = tensor.detach().contiguous().cpu()
        return tensors

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str = "cpu"):
        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a saved model folder")
        data = json.loads(config_file.read_text())
        model_type = data.pop("model_type", None)
        if model_type != cls.model_type:
            raise DataFormatError(config_file, f"holds a '{model_type}' model, not a '{cls.model_type}'", field="model_type")
        model = cls(config_from_dict(cls.config_class, data, source=str(config_file)))
        model.load_weights(directory / WEIGHTS_NAME, map_location=map_location)
        model.attach_preprocessing(directory)
        return model.eval()

    def load_weights(self, path: Path, *, map_location: str = "cpu") -> None:
        stored = load_file(str(path), device=map_location)
        own = self.state_dict()
        by_storage: dict[tuple, list[str]] = {}
        for name, tensor in own.items():
            by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.stride()), []).append(name)
        covered = {n for names in by_storage.values() if any(n in stored for n in names) for n in names}  # tied weights
        missing = sorted(set(own) - covered)
        unexpected = sorted(set(stored) - set(own))
        if missing or unexpected:
            raise DataFormatError(path, f"weights do not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
        for name, tensor in stored.items():
            if tensor.shape != own[name].shape:
                raise DataFormatError(path, f"shape {tuple(tensor.shape)} does not fit {tuple(own[name].shape)}", field=name)
        with torch.no_grad():
            for name, tensor in stored.items():
                own[name].copy_(tensor.to(own[name].dtype))

    def attach_preprocessing(self, directory: Path) -> None:
        if (directory / TOKENIZER_NAME).is_file():
            self.tokenizer = WordTokenizer.from_file(directory / TOKENIZER_NAME)
        if (directory / "preprocessor_config.json").is_file():
            self.image_processor = ImageProcessor.from_pretrained(directory)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
