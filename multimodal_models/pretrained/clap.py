"""Hugging Face ClapModel checkpoints (laion/clap-htsat-unfused, laion/clap-htsat-fused) as our
AudioTextEncoder (models/audio_text.py), and back.

The CLAP layout in our terms:
- audio: HTSAT (models/htsat.py): BatchNorm over the mel bins, the spectrogram folded into a square,
  4x4 patches, Swin stages (windows of 8, shifted every second block, patch merging between
  stages), a final norm, the mean of the tokens; with "enable_fusion", the crops of long clips are
  fused into the patches (mel_conv2d + an AFF block);
- text: RoBERTa (post-norm blocks, positions from pad_token_id + 1, pooler = tanh(dense(<s>)));
- each tower's projection: linear, ReLU, linear; embeddings L2-normalised;
- logits: exp(logit_scale_a) * cosine (logit_scale_t for the text side: same value when trained).
The feature extractor's settings (ClapFeatureExtractor) come from preprocessor_config.json, or the
"feature_extractor" object of processor_config.json (as transformers 5 writes them).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data.hf_tokenizer import checkpoint_tokenizer, read_json_object
from ..errors import DataFormatError
from ..models.audio_text import AudioFeatureExtractor, AudioTextConfig, AudioTextEncoder, RobertaConfig
from ..models.htsat import HTSATConfig, relative_position_index
from ..models.pretrained import atomic_directory
from .checkpoint import read_weights
from .weights import assign_weights, export_tensors

ARCHITECTURE = "ClapModel"
MODEL_TYPE = "clap"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"

_AUDIO = "audio_model.audio_encoder"
_TEXT = "text_model"

# Hugging Face ClapModel key -> our AudioTextEncoder key. "{t}": a text layer; "{s}" / "{b}": an audio
# stage / a block of it; "{m}": a stage followed by a patch merging (all but the last).
KEY_MAP = (
    ("logit_scale_a", "logit_scale_audio"),
    ("logit_scale_t", "logit_scale_text"),
    *[(f"{tower}_projection.linear{i}.{kind}", f"{tower}_projection.fc{i}.{kind}")
      for tower in ("audio", "text") for i in (1, 2) for kind in ("weight", "bias")],
    # text tower
    (f"{_TEXT}.embeddings.word_embeddings.weight", "text.token_embedding.weight"),
    (f"{_TEXT}.embeddings.position_embeddings.weight", "text.position_embedding.weight"),
    (f"{_TEXT}.embeddings.token_type_embeddings.weight", "text.type_embedding.weight"),
    (f"{_TEXT}.embeddings.LayerNorm.weight", "text.embed_norm.weight"),
    (f"{_TEXT}.embeddings.LayerNorm.bias", "text.embed_norm.bias"),
    *[(f"{_TEXT}.encoder.layer.{{t}}.{hf}.{kind}", f"text.blocks.{{t}}.{ours}.{kind}")
      for hf, ours in (("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"),
                       ("attention.self.value", "attn.v"), ("attention.output.dense", "attn.out"),
                       ("attention.output.LayerNorm", "norm1"), ("intermediate.dense", "mlp.fc1"),
                       ("output.dense", "mlp.fc2"), ("output.LayerNorm", "norm2"))
      for kind in ("weight", "bias")],
    (f"{_TEXT}.pooler.dense.weight", "text.pooler.weight"),
    (f"{_TEXT}.pooler.dense.bias", "text.pooler.bias"),
    # audio tower
    *[(f"{_AUDIO}.batch_norm.{kind}", f"audio.input_norm.{kind}")
      for kind in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")],
    (f"{_AUDIO}.patch_embed.proj.weight", "audio.patch_embed.proj.weight"),
    (f"{_AUDIO}.patch_embed.proj.bias", "audio.patch_embed.proj.bias"),
    *[(f"{_AUDIO}.layers.{{s}}.blocks.{{b}}.{hf}", f"audio.stages.{{s}}.blocks.{{b}}.{ours}")
      for hf, ours in (("attention.self.relative_position_bias_table", "attn.relative_bias"),
                       *[(f"{h}.{kind}", f"{o}.{kind}") for h, o in (
                           ("layernorm_before", "norm1"), ("attention.self.query", "attn.q"),
                           ("attention.self.key", "attn.k"), ("attention.self.value", "attn.v"),
                           ("attention.output.dense", "attn.out"), ("layernorm_after", "norm2"),
                           ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"))
                         for kind in ("weight", "bias")])],
    (f"{_AUDIO}.layers.{{m}}.downsample.reduction.weight", "audio.stages.{m}.merge.reduction.weight"),
    (f"{_AUDIO}.layers.{{m}}.downsample.norm.weight", "audio.stages.{m}.merge.norm.weight"),
    (f"{_AUDIO}.layers.{{m}}.downsample.norm.bias", "audio.stages.{m}.merge.norm.bias"),
    (f"{_AUDIO}.norm.weight", "audio.final_norm.weight"),
    (f"{_AUDIO}.norm.bias", "audio.final_norm.bias"),
)
PATCH_NORM_KEYS = tuple((f"{_AUDIO}.patch_embed.norm.{kind}", f"audio.patch_embed.norm.{kind}")
                        for kind in ("weight", "bias"))
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
FUSION_KEYS = (
    (f"{_AUDIO}.patch_embed.mel_conv2d.weight", "audio.patch_embed.crop_proj.weight"),
    (f"{_AUDIO}.patch_embed.mel_conv2d.bias", "audio.patch_embed.crop_proj.bias"),
    *[(f"{_AUDIO}.patch_embed.fusion_model.{branch}.{i}.{kind}", f"audio.patch_embed.fusion.{branch}.{i}.{kind}")
      for branch, convs, norms in (("local_att", (0, 3), (1, 4)), ("global_att", (1, 4), (2, 5)))
      for i, kinds in [*((c, ("weight", "bias")) for c in convs), *((n, _BN) for n in norms)]
      for kind in kinds],
)

# transformers' ClapTextConfig / ClapAudioConfig defaults, for keys a config.json omits.
TEXT_DEFAULTS = {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514,
                 "type_vocab_size": 1, "layer_norm_eps": 1e-12, "pad_token_id": 1}
AUDIO_DEFAULTS = {"window_size": 8, "num_mel_bins": 64, "spec_size": 256, "hidden_act": "gelu", "patch_size": 4,
                  "patch_stride": [4, 4], "hidden_size": 768, "depths": [2, 2, 6, 2],
                  "num_attention_heads": [4, 8, 16, 32], "enable_fusion": False, "fusion_type": None,
                  "patch_embed_input_channels": 1, "flatten_patch_embeds": True, "patch_embeds_hidden_size": 96,
                  "enable_patch_layer_norm": True, "qkv_bias": True, "mlp_ratio": 4.0, "aff_block_r": 4,
                  "layer_norm_eps": 1e-5}
ACTIVATIONS = ("gelu", "relu")  # the names transformers and we share for these towers


def key_rows(config: AudioTextConfig) -> list[tuple[str, str, None]]:
    """KEY_MAP (+ the patch norm and fusion keys where the config has them) for every layer."""
    audio = config.audio
    table = [*KEY_MAP, *(PATCH_NORM_KEYS if audio.patch_norm else ()), *(FUSION_KEYS if audio.fusion else ())]
    rows = []
    for hf, ours in table:
        if "{t}" in hf:
            rows += [(hf.replace("{t}", str(i)), ours.replace("{t}", str(i)), None) for i in range(config.text.depth)]
        elif "{s}" in hf:
            rows += [(hf.replace("{s}", str(s)).replace("{b}", str(b)), ours.replace("{s}", str(s)).replace("{b}", str(b)),
                      None) for s, depth in enumerate(audio.depths) for b in range(depth)]
        elif "{m}" in hf:
            rows += [(hf.replace("{m}", str(s)), ours.replace("{m}", str(s)), None) for s in range(len(audio.depths) - 1)]
        else:
            rows.append((hf, ours, None))
    return rows


def buffer_keys(config: AudioTextConfig) -> dict[str, torch.Tensor]:
    """The index buffers transformers stores with the weights (position and token type ids, each
    window's relative position index): the values it computes, which we compute too."""
    positions = config.text.max_positions
    buffers = {f"{_TEXT}.embeddings.position_ids": torch.arange(positions)[None],
               f"{_TEXT}.embeddings.token_type_ids": torch.zeros(1, positions, dtype=torch.long)}
    sides = config.audio.resolutions()
    for s, depth in enumerate(config.audio.depths):
        index = relative_position_index(min(config.audio.window_size, sides[s]))
        for b in range(depth):
            buffers[f"{_AUDIO}.layers.{s}.blocks.{b}.attention.self.relative_position_index"] = index.clone()
    return buffers


# -- config ---------------------------------------------------------------------------------------


def _pair(value, source: Path, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise DataFormatError(source, f"only square sizes are supported, got {value}", field=field)
        value = value[0]
    return int(value)


def config_from_hf(hf: dict, source: Path) -> AudioTextConfig:
    """Our config from a ClapModel config.json; settings the published checkpoints do not use are refused."""
    text = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    audio = {**AUDIO_DEFAULTS, **(hf.get("audio_config") or {})}

    def refuse(field: str, message: str):
        raise DataFormatError(source, message, field=field)

    for name, tower in (("text_config", text), ("audio_config", audio)):
        if tower["hidden_act"] not in ACTIVATIONS:
            refuse(f"{name}.hidden_act", f"activation {tower['hidden_act']!r} is not supported; expected one of "
                                         f"{ACTIVATIONS}")
    projection_act = hf.get("projection_hidden_act", "relu")
    if projection_act not in ACTIVATIONS:
        refuse("projection_hidden_act", f"activation {projection_act!r} is not supported; expected one of {ACTIVATIONS}")
    patch = _pair(audio["patch_size"], source, "audio_config.patch_size")
    if _pair(audio["patch_stride"], source, "audio_config.patch_stride") != patch:
        refuse("audio_config.patch_stride", f"a patch stride other than the patch size ({patch}) is not supported "
                                            "(the published CLAP checkpoints use 4 and 4)")
    if audio["patch_embed_input_channels"] != 1:
        refuse("audio_config.patch_embed_input_channels", "only one input channel is supported")
    if not audio["flatten_patch_embeds"]:
        refuse("audio_config.flatten_patch_embeds", "only flattened patch embeddings are supported")
    if audio["enable_fusion"] and audio["fusion_type"] not in (None, "aff_2d"):
        refuse("audio_config.fusion_type", f"fusion {audio['fusion_type']!r} is not supported; the published fused "
                                           "checkpoint uses the attentional fusion (fusion_type null / 'aff_2d')")
    if text.get("position_embedding_type", "absolute") != "absolute":  # older config.json files name it
        refuse("text_config.position_embedding_type", f"{text['position_embedding_type']!r} positions are not "
                                                      "supported; RoBERTa's are 'absolute'")
    if not isinstance(text.get("pad_token_id"), int):
        refuse("text_config.pad_token_id", "RoBERTa's positions need an integer pad_token_id")
    depths, heads = list(audio["depths"]), list(audio["num_attention_heads"])
    width = audio["patch_embeds_hidden_size"]
    if audio["hidden_size"] != width * 2 ** (len(depths) - 1):
        refuse("audio_config.hidden_size", f"{audio['hidden_size']} is not the last stage's width "
                                           f"{width * 2 ** (len(depths) - 1)} (patch_embeds_hidden_size x 2^(stages-1))")
    try:
        htsat = HTSATConfig(mel_bins=audio["num_mel_bins"], spec_size=_pair(audio["spec_size"], source, "spec_size"),
                            patch_size=patch, width=width, depths=depths, heads=heads, window_size=audio["window_size"],
                            mlp_ratio=float(audio["mlp_ratio"]), qkv_bias=bool(audio["qkv_bias"]),
                            act=audio["hidden_act"], norm_eps=audio["layer_norm_eps"],
                            patch_norm=bool(audio["enable_patch_layer_norm"]), fusion=bool(audio["enable_fusion"]),
                            fusion_ratio=audio["aff_block_r"])
        htsat.validate()
    except ValueError as exc:
        raise DataFormatError(source, str(exc), field="audio_config") from None
    roberta = RobertaConfig(vocab_size=text["vocab_size"], max_positions=text["max_position_embeddings"],
                            width=text["hidden_size"], depth=text["num_hidden_layers"], heads=text["num_attention_heads"],
                            mlp_hidden=text["intermediate_size"], act=text["hidden_act"], norm_eps=text["layer_norm_eps"],
                            pad_token_id=text["pad_token_id"], type_vocab_size=text["type_vocab_size"])
    return AudioTextConfig(audio=htsat, text=roberta, embed_dim=hf.get("projection_dim", 512),
                           projection_act=projection_act)


def config_to_hf(config: AudioTextConfig, tokenizer=None) -> dict:
    a, t = config.audio, config.text
    text = {"model_type": "clap_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "num_hidden_layers": t.depth, "num_attention_heads": t.heads, "intermediate_size": t.mlp_hidden,
            "hidden_act": t.act, "max_position_embeddings": t.max_positions, "type_vocab_size": t.type_vocab_size,
            "layer_norm_eps": t.norm_eps, "pad_token_id": t.pad_token_id, "projection_dim": config.embed_dim,
            "projection_hidden_act": config.projection_act}
    for name in ("bos", "eos"):
        token_id = getattr(tokenizer, f"{name}_id", None) if tokenizer is not None else None
        if token_id is not None:
            text[f"{name}_token_id"] = token_id
    audio = {"model_type": "clap_audio_model", "window_size": a.window_size, "num_mel_bins": a.mel_bins,
             "spec_size": a.spec_size, "hidden_act": a.act, "patch_size": a.patch_size,
             "patch_stride": [a.patch_size, a.patch_size], "hidden_size": a.out_width, "depths": list(a.depths),
             "num_attention_heads": list(a.heads), "enable_fusion": a.fusion, "fusion_type": None,
             "patch_embed_input_channels": 1, "flatten_patch_embeds": True, "patch_embeds_hidden_size": a.width,
             "enable_patch_layer_norm": a.patch_norm, "qkv_bias": a.qkv_bias, "mlp_ratio": a.mlp_ratio,
             "aff_block_r": a.fusion_ratio, "layer_norm_eps": a.norm_eps, "projection_dim": config.embed_dim,
             "projection_hidden_act": config.projection_act}
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "projection_dim": config.embed_dim,
            "projection_hidden_act": config.projection_act, "dtype": "float32", "text_config": text,
            "audio_config": audio}


# -- reading ----------------------------------------------------------------------------------------


def feature_extractor_config(folder: Path) -> tuple[dict, Path] | None:
    """The ClapFeatureExtractor settings: preprocessor_config.json (transformers 4.x), else the
    "feature_extractor" object of processor_config.json (transformers 5)."""
    config = read_json_object(folder / PREPROCESSOR_FILE)
    if config is not None:
        return config, folder / PREPROCESSOR_FILE
    nested = (read_json_object(folder / PROCESSOR_FILE) or {}).get("feature_extractor")
    if nested is None:
        return None
    if not isinstance(nested, dict):
        raise DataFormatError(folder / PROCESSOR_FILE, f"expected an object, got {type(nested).__name__}",
                              field="feature_extractor")
    return nested, folder / PROCESSOR_FILE


def load_clap(folder: str | os.PathLike, hf_config: dict | None = None) -> AudioTextEncoder:
    """A ClapModel folder as our AudioTextEncoder (float32, or torch's default dtype), with its
    tokenizer and feature extractor, in eval mode."""
    folder = Path(folder)
    source = folder / "config.json"
    if hf_config is None:
        hf_config = json.loads(source.read_text(encoding="utf-8"))
    config = config_from_hf(hf_config, source)
    model = AudioTextEncoder(config)
    tensors = read_weights(folder)
    _check_buffers(tensors, config, folder)
    assign_weights(model, tensors, key_rows(config), folder, optional=set(buffer_keys(config)))
    model.tokenizer = checkpoint_tokenizer(folder)
    if model.tokenizer is None:
        warnings.warn(f"{folder} has no tokenizer.json: the model can embed audio, but texts need a tokenizer "
                      "(set model.tokenizer)", stacklevel=2)
    found = feature_extractor_config(folder)
    if found is not None:
        settings, where = found
        model.audio_processor = AudioFeatureExtractor.from_dict(settings, where)
        _check_features_fit(model.audio_processor, config, where)
    return model.eval()


def _check_buffers(tensors: dict, config: AudioTextConfig, folder: Path) -> None:
    """The stored index buffers, where present, must hold what we compute (transformers uses them)."""
    for key, expected in buffer_keys(config).items():
        if key in tensors and not torch.equal(tensors[key].to(expected.dtype).reshape(expected.shape), expected):
            raise DataFormatError(folder, "holds other values than the standard ones in this index buffer", field=key)


def _check_features_fit(extractor: AudioFeatureExtractor, config: AudioTextConfig, where: Path) -> None:
    audio = config.audio
    if extractor.feature_size != audio.mel_bins:
        raise DataFormatError(where, f"{extractor.feature_size} mel bins, but the model reads {audio.mel_bins}",
                              field="feature_size")
    if extractor.frames > audio.spec_size * audio.freq_ratio:
        raise DataFormatError(where, f"a window of {extractor.frames} frames, more than the model reads "
                                     f"({audio.spec_size * audio.freq_ratio})", field="max_length_s")


# -- writing ----------------------------------------------------------------------------------------


def export_clap(model: AudioTextEncoder, directory: str | os.PathLike) -> Path:
    """Write the model in the ClapModel layout (config.json, model.safetensors, the tokenizer files,
    preprocessor_config.json), so that transformers' ClapModel / ClapProcessor load it with the same outputs."""
    config = model.config
    tensors = export_tensors(model, key_rows(config))
    tensors.update({key: value.contiguous() for key, value in buffer_keys(config).items()})
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config, model.tokenizer), indent=2) + "\n",
                                         encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer.json")
        if model.audio_processor is not None:
            settings = {**model.audio_processor.to_dict(), "processor_class": "ClapProcessor"}
            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return directory
