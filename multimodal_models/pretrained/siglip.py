"""Hugging Face SiglipModel checkpoints (google/siglip-*, and the fixed-resolution google/siglip2-*
that use the same layout) as our DualEncoder.

The SigLIP layout in our terms:
- vision: patch embedding with bias, no class token, learned positions, no norm before the
  blocks, post_layernorm on every output token (final_norm="all"), then the multihead
  attention-pooling head (pool="map": one learned probe, attention, a norm and an MLP); the
  pooled vector is the image embedding (image_projection="none");
- text: bidirectional blocks (causal=False), final_layer_norm, pooled at the last position
  (pool="last") and mapped by `head`, a linear layer with a bias (our text_projection with
  text_projection_bias=True); texts are padded to max_length and the model attends to the pads
  (padding="max_length"), as it was trained;
- logits: exp(logit_scale) * cosine + logit_bias, read through a sigmoid.
The text tokenizer is tokenizer.json where there is one, else the SentencePiece model that SigLIP
(v1) repositories ship (spiece.model), applied as transformers' SiglipTokenizer applies it
(data.hf_tokenizer.SiglipSentencePieceTokenizer).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataFormatError
from ..models.dual_encoder import DualEncoder, DualEncoderConfig
from ..models.text import TextEncoderConfig
from ..models.vision import VisionConfig
from .checkpoint import SQUEEZE, VECTOR, layer_keys, linear_keys
from .clip import HF_ACTIVATIONS, text_tower_fields, vision_tower_fields

ARCHITECTURE = "SiglipModel"
MODEL_TYPE = "siglip"

# Hugging Face SiglipModel key -> our DualEncoder key ("{v}" / "{t}": vision / text layer index).
KEY_MAP = (
    ("logit_scale", "criterion.logit_scale", VECTOR),
    ("logit_bias", "criterion.logit_bias", VECTOR),
    # vision tower
    ("vision_model.embeddings.patch_embedding.weight", "vision.stem.proj.weight"),
    ("vision_model.embeddings.patch_embedding.bias", "vision.stem.proj.bias"),
    ("vision_model.embeddings.position_embedding.weight", "vision.position", SQUEEZE),
    *layer_keys("vision_model.encoder.layers.{v}", "vision.blocks.{v}"),
    *linear_keys("vision_model.post_layernorm", "vision.final_norm"),
    ("vision_model.head.probe", "vision.pool_head.probe"),
    ("vision_model.head.attention.in_proj_weight", "vision.pool_head.attention.in_proj_weight"),
    ("vision_model.head.attention.in_proj_bias", "vision.pool_head.attention.in_proj_bias"),
    *linear_keys("vision_model.head.attention.out_proj", "vision.pool_head.attention.out_proj"),
    *linear_keys("vision_model.head.layernorm", "vision.pool_head.norm"),
    *linear_keys("vision_model.head.mlp.fc1", "vision.pool_head.mlp.fc1"),
    *linear_keys("vision_model.head.mlp.fc2", "vision.pool_head.mlp.fc2"),
    # text tower
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.position", SQUEEZE),
    *layer_keys("text_model.encoder.layers.{t}", "text.blocks.{t}"),
    *linear_keys("text_model.final_layer_norm", "text.final_norm"),
    *linear_keys("text_model.head", "text_projection"),
)

# transformers' SiglipTextConfig / SiglipVisionConfig defaults, for the keys a config.json omits.
TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                 "layer_norm_eps": 1e-6, "projection_size": None}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "vision_use_head": True}


def config_from_hf(hf: dict, source: Path) -> DualEncoderConfig:
    text = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if not vision["vision_use_head"]:
        raise DataFormatError(source, "a SiglipModel needs the attention-pooling head (vision_use_head=true)",
                              field="vision_config.vision_use_head")
    embed_dim = text["projection_size"] or text["hidden_size"]
    if embed_dim != vision["hidden_size"]:
        raise DataFormatError(source, f"the text head's width {embed_dim} differs from the image embedding's "
                                      f"{vision['hidden_size']}", field="text_config.projection_size")
    return DualEncoderConfig(
        vision=VisionConfig(**vision_tower_fields(vision, source), stem="patch", pool="map", class_token=False,
                            pre_norm=False, final_norm="all", patch_bias=True),
        text=TextEncoderConfig(**text_tower_fields(text, source), causal=False, pool="last", padding="max_length"),
        embed_dim=embed_dim,
        loss="siglip",
        image_projection="none",
        text_projection_bias=True,
        prompts="imagenet",
    )


def config_to_hf(config: DualEncoderConfig, tokenizer=None) -> dict:
    """A SiglipModel config.json for our config (check_expressible decides whether it is faithful)."""
    v, t = config.vision, config.text
    text = {
        "model_type": "siglip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
        "intermediate_size": t.mlp_hidden or int(t.width * t.mlp_ratio), "num_hidden_layers": t.depth,
        "num_attention_heads": t.heads, "max_position_embeddings": t.max_length,
        "hidden_act": HF_ACTIVATIONS.get(t.act, t.act), "layer_norm_eps": t.norm_eps,
        "projection_size": config.embed_dim,
    }
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_id", None) if tokenizer is not None else None
        if token_id is not None:
            text[f"{name}_token_id"] = token_id
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": v.width,
        "intermediate_size": v.mlp_hidden or int(v.width * v.mlp_ratio), "num_hidden_layers": v.depth,
        "num_attention_heads": v.heads, "num_channels": v.channels, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": HF_ACTIVATIONS.get(v.act, v.act), "layer_norm_eps": v.norm_eps,
        "vision_use_head": True,
    }
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "dtype": "float32",
            "text_config": text, "vision_config": vision}


def export_tensors(model: DualEncoder, tensors: dict) -> dict:
    return tensors
