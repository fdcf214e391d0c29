"""What CLIP and SigLIP imports share: reading and writing safetensors weights, applying a family's
key table (Hugging Face key -> our key) with every key and shape checked, and building our
DualEncoder with the checkpoint's tokenizer and image preprocessing.

A key table is a tuple of (hf_key, our_key) or (hf_key, our_key, rule) entries. "{v}" and "{t}"
stand for a vision / text layer index. A rule says how Hugging Face stores a tensor that we
store with another, element-for-element equal shape (see `hf_shape`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..data.hf_tokenizer import checkpoint_tokenizer, read_json_object
from ..data.idefics3 import image_processor_config, load_image_processor
from ..data.preprocess import ImageProcessor
from ..errors import DataFormatError
from ..models.dual_encoder import DualEncoder, DualEncoderConfig
from ..models.pretrained import atomic_directory

SQUEEZE = "squeeze"  # HF drops our leading size-1 dims: class token (1, 1, C) -> (C,), positions (1, N, C) -> (N, C)
VECTOR = "vector"  # HF keeps a scalar as a 1-element vector: SigLIP's logit_scale and logit_bias

# Buffers some older checkpoints carry (arange position ids); they hold no weights.
IGNORED_HF_KEYS = frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"})

# One transformer layer, the same in CLIP and SigLIP: HF sub-key -> our sub-key (each a weight and a bias).
ENCODER_LAYER = (
    ("layer_norm1", "norm1"),
    ("self_attn.q_proj", "attn.q"),
    ("self_attn.k_proj", "attn.k"),
    ("self_attn.v_proj", "attn.v"),
    ("self_attn.out_proj", "attn.out"),
    ("layer_norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)


def layer_keys(hf_prefix: str, our_prefix: str) -> tuple[tuple[str, str], ...]:
    """The key-table entries of one encoder layer under the two prefixes."""
    return tuple((f"{hf_prefix}.{hf}.{kind}", f"{our_prefix}.{ours}.{kind}")
                 for hf, ours in ENCODER_LAYER for kind in ("weight", "bias"))


def linear_keys(hf: str, ours: str, *, bias: bool = True) -> tuple[tuple[str, str], ...]:
    """weight (and bias) entries of one linear or norm layer."""
    kinds = ("weight", "bias") if bias else ("weight",)
    return tuple((f"{hf}.{kind}", f"{ours}.{kind}") for kind in kinds)


def hf_shape(rule: str | None, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule is None:
        return our_shape
    if rule == SQUEEZE:
        shape = list(our_shape)
        while len(shape) > 1 and shape[0] == 1:
            shape.pop(0)
        return tuple(shape)
    if rule == VECTOR:
        return (1,) if our_shape == () else our_shape
    raise ValueError(f"unknown shape rule {rule!r}")


def expand(table, config: DualEncoderConfig) -> list[tuple[str, str, str | None]]:
    """The table with "{v}" / "{t}" spelled out for every layer of this config."""
    rows = []
    for entry in table:
        hf, ours, rule = (*entry, None) if len(entry) == 2 else entry
        if "{v}" in hf:
            rows += [(hf.replace("{v}", str(i)), ours.replace("{v}", str(i)), rule) for i in range(config.vision.depth)]
        elif "{t}" in hf:
            rows += [(hf.replace("{t}", str(i)), ours.replace("{t}", str(i)), rule) for i in range(config.text.depth)]
        else:
            rows.append((hf, ours, rule))
    return rows


def _names(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# -- weights in -------------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors file, read one at a time with `safetensors.safe_open`, each
    floating one (F64/F32/F16/BF16, the F8 formats) cast to torch's default dtype as it is read, so
    that with `load(..., dtype="bfloat16")` a float32 file never sits in memory whole next to the
    result. Integer and boolean tensors (I*, U*, BOOL) keep their dtype."""
    target = torch.get_default_dtype()
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():
                tensor = file.get_tensor(name)
                if tensor.is_floating_point() and tensor.dtype != target:
                    try:
                        tensor = tensor.to(target)
                    except RuntimeError:  # packed 4-bit floats (F4) and other quantised storage
                        raise DataFormatError(path, f"tensor {name}: its dtype {tensor.dtype} cannot be cast to "
                                                    f"{target} (a quantised checkpoint, which this package does "
                                                    "not read)", field=name) from None
                tensors[name] = tensor
    except SafetensorError as exc:
        raise DataFormatError(path, f"not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return tensors


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards named by model.safetensors.index.json."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = (read_json_object(index) or {}).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DataFormatError(index, "no 'weight_map' object", field="weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard} not found: {index.name} names it as a shard")
            tensors.update(read_safetensors(folder / shard))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise DataFormatError(index, f"names tensors that no shard holds: {_names(absent)}", field="weight_map")
        return tensors
    if (folder / "pytorch_model.bin").is_file():
        raise DataFormatError(folder / "pytorch_model.bin",
                              "this package reads only safetensors weights (a .bin file is a pickle that can run "
                              "code); convert it once with transformers: "
                              "Model.from_pretrained(dir).save_pretrained(dir)")
    raise FileNotFoundError(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")


def hf_to_ours(tensors: dict[str, torch.Tensor], table, model: DualEncoder, *, family: str,
               source: Path) -> dict[str, torch.Tensor]:
    """Our state dict from a checkpoint's tensors; every key and shape is checked both ways."""
    rows = expand(table, model.config)
    own = model.state_dict()
    wanted = {hf for hf, _, _ in rows}
    missing = sorted(wanted - set(tensors))
    unexpected = sorted(set(tensors) - wanted - IGNORED_HF_KEYS)
    if missing or unexpected:
        parts = [f"missing keys: {_names(missing)}"] * bool(missing)
        parts += [f"unexpected keys: {_names(unexpected)}"] * bool(unexpected)
        raise DataFormatError(source, f"the weights do not fit a {family} checkpoint of this config.json; "
                                      + "; ".join(parts))
    unfilled = sorted(set(own) - {ours for _, ours, _ in rows})
    if unfilled:  # a gap in the key table, not in the checkpoint
        raise RuntimeError(f"the {family} key table fills none of {_names(unfilled)}")
    state = {}
    for hf, ours, rule in rows:
        expected = hf_shape(rule, tuple(own[ours].shape))
        if tuple(tensors[hf].shape) != expected:
            raise DataFormatError(source, f"shape {tuple(tensors[hf].shape)} where this config.json implies {expected}",
                                  field=hf)
        state[ours] = tensors[hf].reshape(own[ours].shape).to(own[ours].dtype)
    return state


def ours_to_hf(model: DualEncoder, table) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    return {hf: own[ours].detach().reshape(hf_shape(rule, tuple(own[ours].shape))).contiguous().cpu()
            for hf, ours, rule in expand(table, model.config)}


# -- the whole model --------------------------------------------------------------------------


def load_dual_encoder(folder: Path, hf_config: dict, *, family: str, table,
                      config_from_hf: Callable[[dict, Path], DualEncoderConfig]) -> DualEncoder:
    """Our DualEncoder with the checkpoint's weights (cast to torch's default dtype, float32 unless
    changed), tokenizer and image processor, in eval mode."""
    config = config_from_hf(hf_config, folder / "config.json")
    with torch.device("meta"):  # no time spent on a random init that the checkpoint overwrites
        model = DualEncoder(config)
    state = hf_to_ours(read_weights(folder), table, model, family=family, source=folder)
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"no checkpoint tensor filled {_names(left)}")
    model.tokenizer = checkpoint_tokenizer(folder)  # tokenizer.json, or SigLIP's spiece.model
    if model.tokenizer is None:
        warnings.warn(f"{folder} has no tokenizer.json (nor a SigLIP spiece.model): the model can embed images, "
                      f"but texts need a tokenizer (set model.tokenizer)", stacklevel=3)
    image_processor = load_image_processor(folder)  # preprocessor_config.json, or processor_config.json's
    if image_processor is not None:
        if not isinstance(image_processor, ImageProcessor):
            raise DataFormatError(image_processor_config(folder)[1], f"a {type(image_processor).__name__} where a "
                                  f"{family} image processor was expected", field="image_processor_type")
        model.image_processor = image_processor
    return model.eval()


def write_hf_folder(model: DualEncoder, directory: Path, hf_config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """config.json + model.safetensors (+ tokenizer and preprocessor files), written atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer.json")
        if model.image_processor is not None:
            model.image_processor.save(tmp)
    return directory


def check_expressible(model_config: DualEncoderConfig, round_trip: DualEncoderConfig, architecture: str) -> None:
    """Refuse an export whose config the Hugging Face layout cannot hold: `round_trip` is our config
    read back from the HF config written for it, and must compute the same thing."""

    def effective(config: DualEncoderConfig) -> dict:
        data = dataclasses.asdict(config)
        for tower in ("vision", "text"):
            part = data[tower]
            part["mlp_hidden"] = part["mlp_hidden"] or int(part["width"] * part["mlp_ratio"])
            for inert in ("mlp_ratio", "dropout", "padding"):  # no effect on what an eval-mode forward computes
                part.pop(inert, None)
        for inert in ("max_logit_scale", "prompts"):  # the scale is exported already clamped
            data.pop(inert)
        return data

    ours, theirs = effective(model_config), effective(round_trip)
    differences = [f"{tower}.{key} is {ours[tower][key]!r} ({architecture} has {theirs[tower][key]!r})"
                   for tower in ("vision", "text") for key in ours[tower] if ours[tower][key] != theirs[tower][key]]
    differences += [f"{key} is {ours[key]!r} ({architecture} has {theirs[key]!r})"
                    for key in ours if key not in ("vision", "text") and ours[key] != theirs[key]]
    if differences:
        raise ValueError(f"this DualEncoder cannot be written as a {architecture}: " + "; ".join(differences))
