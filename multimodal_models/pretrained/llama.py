"""Llama-family decoders in the Hugging Face layout (Llama, Qwen2) -> our CausalDecoder.

Used by the multimodal loaders (LLaVA, Idefics3/SmolVLM), whose language models are these.
`decoder_config` translates the HF `text_config` (every field that changes the numbers is
read or refused); `decoder_rows` is the one explicit table HF key -> our key.

    HF (under a prefix such as "language_model.model.")      ours (under "decoder.")
    embed_tokens.weight                                       token_embedding.weight
    layers.{i}.input_layernorm.weight                         blocks.{i}.norm1.weight
    layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}           blocks.{i}.attn.{q,k,v}.{weight,bias}
    layers.{i}.self_attn.o_proj.{weight,bias}                 blocks.{i}.attn.out.{weight,bias}
    layers.{i}.post_attention_layernorm.weight                blocks.{i}.norm2.weight
    layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}          blocks.{i}.mlp.{gate,up,down}.{weight,bias}
    norm.weight                                               final_norm.weight
    lm_head.weight (its own prefix)                           lm_head.weight (absent when tied)

Llama has biases on q/k/v/o when `attention_bias`; Qwen2 on q/k/v only; both have none on
the MLP unless Llama's `mlp_bias`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import DataFormatError
from ..models.text import DecoderConfig

DECODER_TYPES = ("llama", "qwen2")
# transformers' LlamaConfig / Qwen2Config defaults, for the keys a config.json leaves out.
DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "hidden_act": "silu", "rms_norm_eps": 1e-6},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
              "hidden_act": "silu", "rms_norm_eps": 1e-6},
}

# HF activation names -> ours (models.layers.ACTIVATIONS)
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}


def activation_name(hf_name: str, source: str, field: str) -> str:
    if hf_name not in HF_ACTIVATIONS:
        raise DataFormatError(source, f"activation {hf_name!r} is not supported; known: {sorted(HF_ACTIVATIONS)}",
                              field=field)
    return HF_ACTIVATIONS[hf_name]


def rope_theta(config: dict, source: str, field: str) -> float:
    """The rotary base, from `rope_parameters` (transformers 5) or `rope_theta` (4.x); scaled
    variants (linear, dynamic, llama3, yarn...) are refused rather than run wrong."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = parameters.get("rope_type", parameters.get("type")) or scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default"):
        raise DataFormatError(source, f"RoPE scaling {kind!r} is not supported (only plain RoPE)", field=field)
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def decoder_config(text: dict, *, tie_embeddings: bool | None = None, source: str = "config.json",
                   field: str = "text_config") -> DecoderConfig:
    """Our DecoderConfig for an HF Llama/Qwen2 config dict (missing keys take transformers' defaults).
    tie_embeddings: overrides the config's tie_word_embeddings (a composite model's own flag)."""
    kind = text.get("model_type", "llama")
    if kind not in DECODER_TYPES:
        raise DataFormatError(source, f"language model type {kind!r} is not supported; expected one of {DECODER_TYPES}",
                              field=f"{field}.model_type")
    text = {**DEFAULTS[kind], **text}
    width, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    head_dim = text.get("head_dim") or width // heads
    if head_dim != width // heads:
        raise DataFormatError(source, f"head_dim {head_dim} differs from hidden_size // num_attention_heads "
                              f"({width // heads}); CausalDecoder does not support that yet", field=f"{field}.head_dim")
    if text.get("use_sliding_window"):
        raise DataFormatError(source, "sliding-window attention is not supported", field=f"{field}.use_sliding_window")
    if int(text.get("pretraining_tp") or 1) != 1:
        raise DataFormatError(source, "pretraining_tp other than 1 is not supported", field=f"{field}.pretraining_tp")
    if kind == "qwen2":  # biases on q, k, v only
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = bool(text.get("attention_bias", False))
        mlp_bias = bool(text.get("mlp_bias", False))
    if tie_embeddings is None:
        tie_embeddings = bool(text.get("tie_word_embeddings", False))
    return DecoderConfig(
        vocab_size=int(text["vocab_size"]),
        max_length=int(text["max_position_embeddings"]),
        width=width,
        depth=int(text["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        mlp_hidden=int(text["intermediate_size"]),
        mlp="gated",
        act=activation_name(text["hidden_act"], source, f"{field}.hidden_act"),
        norm="rmsnorm",
        norm_eps=float(text["rms_norm_eps"]),
        position="rope",
        rope_theta=rope_theta(text, source, field),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=tie_embeddings,
    )


def stored_head_tied(tie: bool, tensors: dict[str, torch.Tensor], embed_key: str, head_key: str,
                     source: Path) -> bool:
    """Whether the lm_head is the token embeddings, decided as transformers 5 decides it on loading:
    the config's flag, except that a stored head that differs from the embeddings is used (untied,
    with a warning) rather than dropped."""
    if not tie or head_key not in tensors or embed_key not in tensors:
        return tie
    if torch.equal(tensors[head_key], tensors[embed_key]):
        return True
    warnings.warn(f"{source}: config.json ties the lm_head to the embeddings (tie_word_embeddings), but the stored "
                  f"{head_key} differs from {embed_key}; the stored head is used, as transformers does", stacklevel=3)
    return False


def decoder_rows(config: DecoderConfig, hf_prefix: str, lm_head_key: str, ours: str = "decoder."
                 ) -> list[tuple[str, str, None]]:
    """(HF key, our key, None) for every tensor of the decoder: the table in the module docstring."""
    rows = [(f"{hf_prefix}embed_tokens.weight", f"{ours}token_embedding.weight"),
            (f"{hf_prefix}norm.weight", f"{ours}final_norm.weight")]
    linear = [("self_attn.q_proj", "attn.q", config.qkv_bias), ("self_attn.k_proj", "attn.k", config.qkv_bias),
              ("self_attn.v_proj", "attn.v", config.qkv_bias), ("self_attn.o_proj", "attn.out", config.out_bias),
              ("mlp.gate_proj", "mlp.gate", config.mlp_bias), ("mlp.up_proj", "mlp.up", config.mlp_bias),
              ("mlp.down_proj", "mlp.down", config.mlp_bias)]
    for i in range(config.depth):
        hf, own = f"{hf_prefix}layers.{i}.", f"{ours}blocks.{i}."
        rows += [(f"{hf}input_layernorm.weight", f"{own}norm1.weight"),
                 (f"{hf}post_attention_layernorm.weight", f"{own}norm2.weight")]
        for theirs, mine, bias in linear:
            rows.append((f"{hf}{theirs}.weight", f"{own}{mine}.weight"))
            if bias:
                rows.append((f"{hf}{theirs}.bias", f"{own}{mine}.bias"))
    if not config.tie_embeddings:
        rows.append((lm_head_key, f"{ours}lm_head.weight"))
    return [(hf, mine, None) for hf, mine in rows]


def decoder_to_hf_config(config: DecoderConfig, kind: str) -> dict:
    """The HF text_config for our decoder (export); `kind` is "llama" or "qwen2"."""
    if config.mlp != "gated" or config.norm != "rmsnorm" or config.position != "rope":
        raise ValueError("only Llama-style decoders (gated MLP, RMSNorm, RoPE) can be exported to the HF layout")
    if kind == "qwen2" and (not config.qkv_bias or config.out_bias or config.mlp_bias):
        raise ValueError("a Qwen2 decoder has q/k/v biases and no others")
    if kind == "llama" and (config.qkv_bias != config.out_bias):
        raise ValueError("a Llama decoder has biases on all of q/k/v/o or on none")
    act = {v: k for k, v in HF_ACTIVATIONS.items() if k in ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu")}
    text = {
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_length,
        "hidden_size": config.width,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads or config.heads,
        "intermediate_size": config.mlp_hidden or 4 * config.width,
        "hidden_act": act[config.act],
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
    }
    if kind == "llama":
        text.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    return text
