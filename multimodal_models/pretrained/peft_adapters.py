"""LoRA adapters in peft's folder layout: written from our LoRA layers, read from peft's or ours.

    adapter = adapter_from_model(model, base="llava-hf/llava-1.5-7b-hf", base_folder=folder)
    adapter.save_pretrained("out/adapter")                      # peft.PeftModel.from_pretrained reads it
    apply_adapter(model, "out/adapter", base_folder=folder)     # folds it into the weights

The folder holds `adapter_config.json` (peft's LoraConfig: peft_type "LORA", r, lora_alpha,
target_modules, base_model_name_or_path, task_type, ...) and `adapter_model.safetensors`, one
pair of tensors per adapted nn.Linear:

    base_model.model.<module path>.lora_A.weight    (r, in)
    base_model.model.<module path>.lora_B.weight    (out, r)

and the layer computes  W x + (lora_alpha / r) B A x  (lora_alpha / sqrt(r) with use_rslora).

The module path is the one peft sees in the base model. For a Hugging Face family it is
transformers' module path, mapped to ours through the family's own key table (`llava.key_rows`,
`idefics3.key_rows`: the rows of the linear layers' weights); reading accepts any spelling the
family's loader accepts (`llava.hub_key` normalises LLaVA's old and new names), writing uses the
names of transformers >= 4.52 (LLaVA's parts under `model.`), which peft writes too. For this
package's own model types the module path is ours ("decoder.blocks.0.attn.q"); peft cannot load
those models, but `multimodal_models.load(base, adapter=...)` can.

What this reads is plain LoRA on linear layers. An adapter that needs more is refused with the
file and the field named: another peft_type (IA3, LoKr, ...), DoRA, biases, embedding LoRA,
modules_to_save, initialisations that replace the base weights (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA), and a layer the base does not have or whose shape differs (an adapter of another base).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import registry
from ..errors import DataFormatError
from ..models.lora import lora_modules, shared_weights, wrap_linear
from ..models.pretrained import atomic_directory
from . import idefics3, llava

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the base model
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")

# adapter_config.json fields that change what the adapter computes and are not read here (truthy: refused)
REFUSED_FIELDS = {
    "use_dora": "DoRA", "use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA", "lora_bias": "LoRA biases",
    "fan_in_fan_out": "Conv1D (fan_in_fan_out) layers", "modules_to_save": "fully trained modules (modules_to_save)",
    "layer_replication": "layer replication", "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "activated LoRA",
    "megatron_config": "Megatron layers", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA", "astra_config": "ASTRA",
    "loftq_config": "LoftQ", "corda_config": "CorDA", "lora_ga_config": "LoRA-GA",
}
# adapter_config.json fields known to need nothing here (bookkeeping, or how the adapter was initialised)
KNOWN_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "bias",
                "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "megatron_core", "qalora_group_size", "eva_config", "runtime_config",
                "ensure_weight_tying"}
# init_lora_weights that replace the base's weights by a residual: the adapter is only right on that residual
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class Family:
    """A Hugging Face layout's module paths: its key table, and its spellings of the keys."""

    rows: Callable  # (our VLMConfig, HF config.json dict, source) -> [(HF key, our key, rule)]
    normalise: Callable[[str], str]  # any spelling of an HF key -> the table's
    spell: Callable[[str], str]  # the table's spelling of a module path -> transformers' in memory (peft's)
    architecture: str
    library: str  # transformers module of the architecture (peft's auto_mapping)


def _llava_module_path(path: str) -> str:
    """llava.key_rows' (the hub's) spelling of a module path -> transformers' in memory since 4.52, where
    peft finds it; llava.hub_key reads it back."""
    for table, memory in (("vision_tower.vision_model.", "model.vision_tower."),
                          ("multi_modal_projector.", "model.multi_modal_projector."),
                          ("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head")):
        if path.startswith(table):
            return memory + path[len(table):]
    return path


def _same(path: str) -> str:
    return path


FAMILIES = {
    llava.MODEL_TYPE: Family(
        rows=lambda config, hf, source: llava.key_rows(config, hf.get("vision_config") or llava.DEFAULT_VISION, source),
        normalise=llava.hub_key, spell=_llava_module_path, architecture=llava.ARCHITECTURE,
        library="transformers.models.llava.modeling_llava"),
    # Idefics3 / SmolVLM checkpoints store the names transformers uses in memory: one spelling
    **{kind: Family(rows=lambda config, hf, source: idefics3.key_rows(config), normalise=_same, spell=_same,
                    architecture=architecture, library=f"transformers.models.{kind}.modeling_{kind}")
       for kind, architecture in idefics3.ARCHITECTURES.items()},
}


class ModulePaths:
    """Our module paths <-> the module paths an adapter of this base names (peft's view of the base)."""

    def __init__(self, model: nn.Module, base_folder: Path):
        self.config_file = Path(base_folder) / "config.json"
        hf = json.loads(self.config_file.read_text(encoding="utf-8"))
        model_type = hf.get("model_type")
        self.family = FAMILIES.get(model_type)
        if self.family is None and model_type not in registry.MODEL_TYPES:
            raise DataFormatError(self.config_file, f"adapters are read for Hugging Face {sorted(FAMILIES)} checkpoints "
                                  f"and this package's own models, not for model_type {model_type!r}",
                                  field="model_type")
        self.linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        self._ours: dict[str, str] = {}  # the table's spelling -> ours
        if self.family is not None:
            for theirs, ours, rule in self.family.rows(model.config, hf, self.config_file):
                if rule is None and theirs.endswith(".weight") and ours[: -len(".weight")] in self.linear:
                    self._ours[theirs[: -len(".weight")]] = ours[: -len(".weight")]
        self._theirs = {ours: theirs for theirs, ours in self._ours.items()}

    def to_ours(self, path: str) -> str | None:
        """Our linear layer that an adapter's module path names (None: the base has none there)."""
        if self.family is None:
            return path if path in self.linear else None
        return self._ours.get(self.family.normalise(path + ".weight")[: -len(".weight")])

    def to_adapter(self, ours: str) -> str:
        """The module path an adapter written now gives our linear layer `ours`."""
        if self.family is None:
            return ours
        if ours not in self._theirs:
            raise ValueError(f"{ours} has no place in the {self.family.architecture} layout; an adapter of it cannot "
                             f"be written")
        return self.family.spell(self._theirs[ours])

    def targets(self) -> list[str]:
        """Every linear layer's module path as an adapter names it (to check target_modules against)."""
        if self.family is None:
            return sorted(self.linear)
        return sorted(self._ours)


# -- writing --------------------------------------------------------------------------------------


@dataclass
class LoRAAdapter:
    """A LoRA adapter as peft stores it: the fields of adapter_config.json and the tensors by peft key."""

    config: dict
    tensors: dict[str, torch.Tensor]

    def save_pretrained(self, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (the folder replaced atomically);
        `dtype` (e.g. torch.float16) shrinks the stored tensors."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
            tensors = {k: (t if dtype is None else t.to(dtype)).contiguous() for k, t in self.tensors.items()}
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return directory


def adapter_from_model(model: nn.Module, *, base: str, base_folder: str | os.PathLike) -> LoRAAdapter:
    """The LoRA layers of `model` (models.lora) as an adapter of `base`: the name or path written as
    base_model_name_or_path, whose folder (`base_folder`) says the layout (Hugging Face family or ours)."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (models.lora.apply_lora adds them)")
    first = next(iter(layers.values()))
    if any(layer.rank != first.rank or not math.isclose(layer.scale, first.scale) for layer in layers.values()):
        raise ValueError("the LoRA layers differ in rank or scale; an adapter is written for one rank and alpha")
    paths = ModulePaths(model, Path(base_folder))
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for ours, layer in layers.items():
        theirs = paths.to_adapter(ours)
        targets.append(theirs)
        tensors[f"{PEFT_PREFIX}{theirs}.lora_A.weight"] = layer.lora_a.detach().float().cpu().clone()
        tensors[f"{PEFT_PREFIX}{theirs}.lora_B.weight"] = layer.lora_b.detach().float().cpu().clone()
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    alpha = first.scale * first.rank
    family = paths.family
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "r": first.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,  # full module paths: exactly these layers, in every peft version
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": None if family is None else {"base_model_class": family.architecture,
                                                     "parent_library": family.library},
    }
    return LoRAAdapter(config, tensors)


# -- reading --------------------------------------------------------------------------------------


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A folder with an adapter_config.json and no config.json of a model."""
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """adapter_config.json as a dict, with the fields this package reads checked (file and field named)."""
    path = Path(folder).expanduser() / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not an adapter folder (peft's layout: "
                                f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise DataFormatError(path, "expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise DataFormatError(path, f"peft_type {config.get('peft_type')!r} is not supported; this package applies "
                              f"'LORA' adapters", field="peft_type")
    for field, feature in REFUSED_FIELDS.items():
        if config.get(field):
            raise DataFormatError(path, f"{feature} ({field}: {config[field]!r}) is not supported; plain LoRA on "
                                  f"linear layers is", field=field)
    for field, value in config.items():  # a feature of a newer peft: refused rather than applied wrong
        if field not in KNOWN_FIELDS and value and (field.startswith("use_") or field.endswith("_config")):
            raise DataFormatError(path, f"{field}: {value!r} is not supported (a peft feature this package does not "
                                  f"apply)", field=field)
    if config.get("bias", "none") != "none":
        raise DataFormatError(path, f"bias {config['bias']!r} is not supported (only 'none')", field="bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise DataFormatError(path, f"init_lora_weights {init!r} replaces the base model's weights; such an adapter "
                              f"is only right on that modified base (peft: save it with "
                              f"path_initial_model_for_weight_conversion)", field="init_lora_weights")
    for field, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(field, 8)
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise DataFormatError(path, f"expected a positive number, got {value!r}", field=field)
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise DataFormatError(path, f"expected an object of pattern: value, got {config[field]!r}", field=field)
    return config


def adapter_base(folder: str | os.PathLike) -> str:
    """The base model an adapter folder names (base_model_name_or_path)."""
    config = read_adapter_config(folder)
    base = config.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise DataFormatError(Path(folder) / ADAPTER_CONFIG, "names no base model; pass the base: "
                              "load(BASE, adapter=FOLDER)", field="base_model_name_or_path")
    return base


def _pattern_value(patterns: dict, path: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of the path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def apply_adapter(model: nn.Module, folder: str | os.PathLike, *, base_folder: str | os.PathLike,
                  merge: bool = True) -> nn.Module:
    """Apply the LoRA adapter in `folder` (peft's layout) to `model`, loaded from `base_folder`.

    merge=True folds each update into its layer's weight (computed in float32, rounded once to the
    weight's dtype, on its device): the model stays a plain model of its class, as fast as the base.
    merge=False wraps the layers in LoRALinear instead (the adapter stays separate, e.g. to train on).
    Every layer the adapter names must be a linear layer of the base with the adapter's shapes."""
    folder = Path(folder).expanduser()
    config = read_adapter_config(folder)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        other = " (adapter_model.bin: save it with safe_serialization=True)" if (folder / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{weights_file} not found{other}")
    paths = ModulePaths(model, Path(base_folder))
    made_for = config.get("base_model_name_or_path") or "another model"
    _check_targets(config, paths, config_file, made_for)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = _LORA_KEY.match(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else None
        if match is None:
            raise DataFormatError(weights_file, f"{key!r} is not the lora_A / lora_B weight of a linear layer under "
                                  f"'{PEFT_PREFIX}' (embedding LoRA, DoRA magnitudes, biases and modules_to_save "
                                  f"are not supported)", field=key)
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    if not pairs:
        raise DataFormatError(weights_file, "holds no LoRA weights")

    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    updates = []
    for path, pair in pairs.items():
        key = f"{PEFT_PREFIX}{path}.lora_A.weight"
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise DataFormatError(weights_file, f"{path} has no {missing} weight", field=key)
        ours = paths.to_ours(path)
        if ours is None:
            raise DataFormatError(weights_file, f"adapts {path}, which the base ({base_folder}) has no linear layer "
                                  f"at; the adapter was made for {made_for}", field=key)
        layer = model.get_submodule(ours)
        a, b = pair["A"], pair["B"]
        r = _pattern_value(config.get("rank_pattern") or {}, path, rank)
        if a.dim() != 2 or b.dim() != 2 or a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
            raise DataFormatError(weights_file, f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                  f"fit a rank-{r} update of the base's ({layer.out_features}, {layer.in_features}) "
                                  f"layer; the adapter was made for {made_for}", field=key)
        layer_alpha = _pattern_value(config.get("alpha_pattern") or {}, path, alpha)
        scale = layer_alpha / math.sqrt(r) if config.get("use_rslora") else layer_alpha / r
        updates.append((ours, a, b, r, scale))

    shared = shared_weights(model)
    for ours, a, b, r, scale in updates:  # every layer checked before any is changed
        if id(model.get_submodule(ours).weight) in shared:
            raise DataFormatError(weights_file, f"adapts {ours}, whose weight is tied to another module (the "
                                  f"embeddings); that is not supported")
    with torch.no_grad():
        for ours, a, b, r, scale in updates:
            layer = model.get_submodule(ours)
            if merge:
                update = (b.float().to(layer.weight.device) @ a.float().to(layer.weight.device)) * scale
                layer.weight.copy_(layer.weight.float() + update)
            else:
                wrapped = wrap_linear(model, ours, rank=r, alpha=scale * r,
                                      dropout=float(config.get("lora_dropout") or 0.0), scale=scale)
                wrapped.lora_a.copy_(a)
                wrapped.lora_b.copy_(b)
    return model


def _check_targets(config: dict, paths: ModulePaths, config_file: Path, made_for: str) -> None:
    """A target_modules list must name linear layers the base has: as peft, at least one of its names
    (matched against the end of a module path; a list written for several architectures may hold names
    another one has). A regex string or "all-linear" is left to the weights' keys."""
    targets = config.get("target_modules")
    if targets is None or isinstance(targets, str):
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise DataFormatError(config_file, f"expected a list of module names or a regex, got {targets!r}",
                              field="target_modules")
    normalise = paths.family.normalise if paths.family else _same
    known = paths.targets()
    for target in targets:
        name = normalise(target + ".weight")[: -len(".weight")]
        if any(path == name or path.endswith(("." + name, "." + target)) for path in known):
            return
    raise DataFormatError(config_file, f"{targets} name no linear layer of the base model "
                          f"({paths.config_file.parent}); the adapter was made for {made_for}", field="target_modules")
