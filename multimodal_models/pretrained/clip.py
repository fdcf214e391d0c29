"""Hugging Face CLIPModel checkpoints (openai/clip-vit-*, laion/CLIP-*, ...) as our DualEncoder.

The CLIP layout in our terms:
- vision: patch embedding without bias, a class token, learned positions, pre_layrnorm before
  the blocks (our pre_norm), post_layernorm on the pooled class token only (final_norm="pooled"),
  then a bias-free visual_projection;
- text: causal blocks, final_layer_norm, pooled at the end-of-text token: the first position of
  eos_token_id (pool="eos"), or for configs written before transformers fixed eos_token_id
  (eos_token_id == 2) the position of the highest id (pool="argmax"), then a bias-free
  text_projection; texts are padded to the longest and the pads masked out;
- logits: exp(logit_scale) * cosine, with no cap on logit_scale (transformers applies none).
Activations: quick_gelu (OpenAI) or gelu (LAION).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataFormatError
from ..models.dual_encoder import DualEncoder, DualEncoderConfig
from ..models.text import TextEncoderConfig
from ..models.vision import VisionConfig
from .checkpoint import SQUEEZE, layer_keys, linear_keys

ARCHITECTURE = "CLIPModel"
MODEL_TYPE = "clip"

# Hugging Face CLIPModel key -> our DualEncoder key ("{v}" / "{t}": vision / text layer index).
KEY_MAP = (
    ("logit_scale", "criterion.logit_scale"),
    ("visual_projection.weight", "image_projection.weight"),
    ("text_projection.weight", "text_projection.weight"),
    # vision tower
    ("vision_model.embeddings.class_embedding", "vision.class_token", SQUEEZE),
    ("vision_model.embeddings.patch_embedding.weight", "vision.stem.proj.weight"),
    ("vision_model.embeddings.position_embedding.weight", "vision.position", SQUEEZE),
    *linear_keys("vision_model.pre_layrnorm", "vision.pre_norm"),
    *layer_keys("vision_model.encoder.layers.{v}", "vision.blocks.{v}"),
    *linear_keys("vision_model.post_layernorm", "vision.final_norm"),
    # text tower
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.position", SQUEEZE),
    *layer_keys("text_model.encoder.layers.{t}", "text.blocks.{t}"),
    *linear_keys("text_model.final_layer_norm", "text.final_norm"),
)

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for the keys older config.json files omit.
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "eos_token_id": 49407}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                   "layer_norm_eps": 1e-5}
# Hugging Face activation name -> ours (models/layers.ACTIVATIONS).
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
LEGACY_EOS_ID = 2  # transformers reads eos_token_id == 2 as "pool at the highest id"


def sub_config(hf: dict, name: str, defaults: dict) -> dict:
    """text_config / vision_config over the defaults; old files' *_config_dict wins, as in transformers."""
    return {**defaults, **(hf.get(f"{name}_config") or {}), **(hf.get(f"{name}_config_dict") or {})}


def activation(name: str, source: Path, field: str) -> str:
    if name not in ACTIVATIONS:
        raise DataFormatError(source, f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}",
                              field=field)
    return ACTIVATIONS[name]


def square(value, source: Path, field: str) -> int:
    """image_size / patch_size: an int, or a [h, w] pair with h == w."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise DataFormatError(source, f"only square sizes are supported, got {value}", field=field)
        value = value[0]
    return int(value)


def transformer_fields(tower: dict, source: Path, field: str) -> dict:
    """The sizes every CLIP / SigLIP transformer tower shares, as our config's keyword arguments."""
    return dict(width=tower["hidden_size"], depth=tower["num_hidden_layers"], heads=tower["num_attention_heads"],
                mlp_ratio=tower["intermediate_size"] / tower["hidden_size"], mlp_hidden=tower["intermediate_size"],
                act=activation(tower["hidden_act"], source, f"{field}.hidden_act"), norm_eps=tower["layer_norm_eps"])


def vision_tower_fields(vision: dict, source: Path) -> dict:
    return dict(image_size=square(vision["image_size"], source, "vision_config.image_size"),
                patch_size=square(vision["patch_size"], source, "vision_config.patch_size"),
                channels=vision["num_channels"], **transformer_fields(vision, source, "vision_config"))


def text_tower_fields(text: dict, source: Path) -> dict:
    return dict(vocab_size=text["vocab_size"], max_length=text["max_position_embeddings"],
                **transformer_fields(text, source, "text_config"))


def config_from_hf(hf: dict, source: Path) -> DualEncoderConfig:
    text, vision = sub_config(hf, "text", TEXT_DEFAULTS), sub_config(hf, "vision", VISION_DEFAULTS)
    eos = text["eos_token_id"]
    if not isinstance(eos, int):
        raise DataFormatError(source, f"expected one integer, got {eos!r}", field="text_config.eos_token_id")
    return DualEncoderConfig(
        vision=VisionConfig(**vision_tower_fields(vision, source), stem="patch", pool="cls", class_token=True,
                            pre_norm=True, final_norm="pooled", patch_bias=False),
        text=TextEncoderConfig(**text_tower_fields(text, source), causal=True,
                               pool="argmax" if eos == LEGACY_EOS_ID else "eos",
                               eos_token_id=None if eos == LEGACY_EOS_ID else eos, padding="longest"),
        embed_dim=hf.get("projection_dim", 512),
        loss="clip",
        image_projection="linear",
        text_projection_bias=False,
        max_logit_scale=None,
        prompts="imagenet",
    )


def config_to_hf(config: DualEncoderConfig, tokenizer=None) -> dict:
    """A CLIPModel config.json for our config (check_expressible decides whether it is faithful)."""
    v, t = config.vision, config.text
    text = {
        "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
        "intermediate_size": t.mlp_hidden or int(t.width * t.mlp_ratio), "num_hidden_layers": t.depth,
        "num_attention_heads": t.heads, "max_position_embeddings": t.max_length,
        "hidden_act": HF_ACTIVATIONS.get(t.act, t.act), "layer_norm_eps": t.norm_eps,
        "projection_dim": config.embed_dim,
        "eos_token_id": t.eos_token_id if t.pool == "eos" else LEGACY_EOS_ID,
    }
    for name in ("bos", "pad"):
        token_id = getattr(tokenizer, f"{name}_id", None) if tokenizer is not None else None
        if token_id is not None:
            text[f"{name}_token_id"] = token_id
    vision = {
        "model_type": "clip_vision_model", "hidden_size": v.width,
        "intermediate_size": v.mlp_hidden or int(v.width * v.mlp_ratio), "num_hidden_layers": v.depth,
        "num_attention_heads": v.heads, "num_channels": v.channels, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": HF_ACTIVATIONS.get(v.act, v.act), "layer_norm_eps": v.norm_eps,
        "projection_dim": config.embed_dim,
    }
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "projection_dim": config.embed_dim,
            "logit_scale_init_value": 2.6592, "dtype": "float32", "text_config": text, "vision_config": vision}


def export_tensors(model: DualEncoder, tensors: dict) -> dict:
    """CLIPModel applies no cap to logit_scale: write the value our model actually uses."""
    tensors["logit_scale"] = model.criterion.scale().detach().reshape(()).clone()
    return tensors
