"""Whisper checkpoints (transformers' WhisperForConditionalGeneration) in our SpeechToText, and back.

    model = multimodal_models.load("openai/whisper-tiny")   # or a folder in that layout
    model.transcribe("question.wav")
    export_whisper(model, "out/")                            # WhisperForConditionalGeneration.from_pretrained("out/")

What a folder says, read as transformers reads it: config.json (the sizes), model.safetensors (every
key and shape checked by KEY_MAP; proj_out.weight only where the embeddings are not tied),
generation_config.json (start, end and pad tokens, <|notimestamps|>, the language and task tokens,
forced decoder ids, suppressed tokens, max_length; config.json's where there is none), the feature
extractor's settings (preprocessor_config.json, or the "feature_extractor" object transformers 5
nests in processor_config.json) and the tokenizer (tokenizer.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.hf_tokenizer import HFTokenizer, read_json_object
from ..errors import DataFormatError, WrongModelError
from ..models.pretrained import atomic_directory
from ..models.speech import SpeechToText, SpeechToTextConfig
from .checkpoint import read_weights
from .weights import assign_weights, expand_rows, export_tensors

MODEL_TYPE = "whisper"
ARCHITECTURE = "WhisperForConditionalGeneration"

_ATTENTION = (("q_proj.weight", "q.weight"), ("q_proj.bias", "q.bias"), ("k_proj.weight", "k.weight"),
              ("v_proj.weight", "v.weight"), ("v_proj.bias", "v.bias"), ("out_proj.weight", "out.weight"),
              ("out_proj.bias", "out.bias"))
_NORM_MLP = tuple((f"{hf}.{kind}", f"{ours}.{kind}") for hf, ours in
                  (("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2"), ("fc1", "mlp.fc1"),
                   ("fc2", "mlp.fc2")) for kind in ("weight", "bias"))
ENCODER_KEYS = (
    ("model.encoder.conv1.weight", "encoder.conv1.weight"), ("model.encoder.conv1.bias", "encoder.conv1.bias"),
    ("model.encoder.conv2.weight", "encoder.conv2.weight"), ("model.encoder.conv2.bias", "encoder.conv2.bias"),
    ("model.encoder.embed_positions.weight", "encoder.positions"),
    *((f"model.encoder.layers.{{e}}.self_attn.{hf}", f"encoder.blocks.{{e}}.attn.{ours}") for hf, ours in _ATTENTION),
    *((f"model.encoder.layers.{{e}}.{hf}", f"encoder.blocks.{{e}}.{ours}") for hf, ours in _NORM_MLP),
    ("model.encoder.layer_norm.weight", "encoder.norm.weight"), ("model.encoder.layer_norm.bias", "encoder.norm.bias"),
)
DECODER_KEYS = (
    ("model.decoder.embed_tokens.weight", "decoder.embed.weight"),
    ("model.decoder.embed_positions.weight", "decoder.positions"),
    *((f"model.decoder.layers.{{d}}.self_attn.{hf}", f"decoder.blocks.{{d}}.attn.{ours}") for hf, ours in _ATTENTION),
    *((f"model.decoder.layers.{{d}}.encoder_attn.{hf}", f"decoder.blocks.{{d}}.cross_attn.{ours}")
      for hf, ours in _ATTENTION),
    ("model.decoder.layers.{d}.encoder_attn_layer_norm.weight", "decoder.blocks.{d}.cross_norm.weight"),
    ("model.decoder.layers.{d}.encoder_attn_layer_norm.bias", "decoder.blocks.{d}.cross_norm.bias"),
    *((f"model.decoder.layers.{{d}}.{hf}", f"decoder.blocks.{{d}}.{ours}") for hf, ours in _NORM_MLP),
    ("model.decoder.layer_norm.weight", "decoder.norm.weight"), ("model.decoder.layer_norm.bias", "decoder.norm.bias"),
)
LM_HEAD = ("proj_out.weight", "decoder.lm_head.weight")
KEY_MAP = ENCODER_KEYS + DECODER_KEYS + (LM_HEAD,)  # the whole table; "{e}"/"{d}": encoder/decoder layer

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu"}
FEATURE_FILES = ("preprocessor_config.json", "processor_config.json")


def key_rows(config: SpeechToTextConfig) -> list[tuple[str, str, str | None]]:
    rows = expand_rows(ENCODER_KEYS, config.encoder_depth, placeholder="{e}")
    rows += expand_rows(DECODER_KEYS, config.decoder_depth, placeholder="{d}")
    if not config.tie_word_embeddings:
        rows.append((*LM_HEAD, None))
    return rows


def _int(config: dict, key: str, source: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataFormatError(source, f"expected a whole number, got {value!r}", field=key)
    return value


def feature_settings(folder: Path) -> tuple[dict | None, Path]:
    """The WhisperFeatureExtractor's settings and the file they came from (None when the folder has none)."""
    for name in FEATURE_FILES:
        data = read_json_object(folder / name)
        if data is None:
            continue
        if name == "processor_config.json":
            data = data.get("feature_extractor")
            if not isinstance(data, dict):
                continue
        return data, folder / name
    return None, folder / FEATURE_FILES[0]


def config_from_hf(hf: dict, source: Path, generation: dict | None = None,
                   features: dict | None = None, features_file: Path | None = None) -> SpeechToTextConfig:
    """Our config from config.json (+ generation_config.json and the feature extractor's settings)."""
    activation = hf.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise DataFormatError(source, f"activation {activation!r} is not supported; known: {sorted(ACTIVATIONS)}",
                              field="activation_function")
    n_mels = _int(hf, "num_mel_bins", source, 80)
    gen = generation if generation is not None else hf  # transformers builds a generation config from config.json
    gen_source = source.with_name("generation_config.json") if generation is not None else source
    features = dict(features or {})
    features_file = features_file or source.with_name("preprocessor_config.json")
    if features.get("feature_size", n_mels) != n_mels:
        raise DataFormatError(features_file, f"{features['feature_size']} mel bins, but config.json's num_mel_bins "
                                             f"is {n_mels}", field="feature_size")
    for key, neutral in (("dither", 0.0), ("padding_value", 0.0), ("do_normalize", False)):
        if features.get(key) not in (None, neutral):
            raise DataFormatError(features_file, f"{key} {features[key]!r} is not supported (only {neutral!r})",
                                  field=key)
    forced = gen.get("forced_decoder_ids") or []
    if not isinstance(forced, list) or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in forced):
        raise DataFormatError(gen_source, f"expected [position, token id] pairs, got {forced!r}",
                              field="forced_decoder_ids")
    config = SpeechToTextConfig(
        n_mels=n_mels, width=_int(hf, "d_model", source, 384),
        encoder_depth=_int(hf, "encoder_layers", source, 4), encoder_heads=_int(hf, "encoder_attention_heads", source, 6),
        encoder_mlp=_int(hf, "encoder_ffn_dim", source, 1536),
        decoder_depth=_int(hf, "decoder_layers", source, 4), decoder_heads=_int(hf, "decoder_attention_heads", source, 6),
        decoder_mlp=_int(hf, "decoder_ffn_dim", source, 1536), vocab_size=_int(hf, "vocab_size", source, 51865),
        max_source_positions=_int(hf, "max_source_positions", source, 1500),
        max_target_positions=_int(hf, "max_target_positions", source, 448),
        act=ACTIVATIONS[activation],  # (scale_embedding: transformers' Whisper never applies it, nor do we)
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sampling_rate=_int(features, "sampling_rate", features_file, 16000),
        n_fft=_int(features, "n_fft", features_file, 400), hop_length=_int(features, "hop_length", features_file, 160),
        chunk_length=_int(features, "chunk_length", features_file, 30),
        decoder_start_token_id=_int(gen, "decoder_start_token_id", gen_source, 50258),
        eos_token_id=_int(gen, "eos_token_id", gen_source, 50257),
        pad_token_id=_int(gen, "pad_token_id", gen_source, _int(gen, "eos_token_id", gen_source, 50257)),
        no_timestamps_token_id=gen.get("no_timestamps_token_id"),
        language_tokens=dict(gen.get("lang_to_id") or {}), task_tokens=dict(gen.get("task_to_id") or {}),
        is_multilingual=gen.get("is_multilingual"), forced_decoder_ids=[list(p) for p in forced],
        suppress_tokens=list(gen.get("suppress_tokens") or []),
        begin_suppress_tokens=list(gen.get("begin_suppress_tokens") or []),
        max_length=_int(gen, "max_length", gen_source, 20),  # transformers' GenerationConfig default
    )
    frames = config.chunk_length * config.sampling_rate // config.hop_length
    if frames != 2 * config.max_source_positions:
        raise DataFormatError(features_file, f"chunk_length {config.chunk_length} s makes {frames} mel frames; "
                                             f"config.json's max_source_positions {config.max_source_positions} "
                                             f"needs {2 * config.max_source_positions}", field="chunk_length")
    for heads, key in ((config.encoder_heads, "encoder_attention_heads"), (config.decoder_heads, "decoder_attention_heads")):
        if config.width % heads:
            raise DataFormatError(source, f"d_model {config.width} does not divide into {heads} heads", field=key)
    return config


def load_whisper(folder: str | os.PathLike, hf_config: dict | None = None) -> SpeechToText:
    """A WhisperForConditionalGeneration folder as our SpeechToText (eval mode), tokenizer attached."""
    folder = Path(folder)
    source = folder / "config.json"
    if hf_config is None:
        hf_config = read_json_object(source)
        if hf_config is None:
            raise FileNotFoundError(f"{source} not found: not a checkpoint folder")
    features, features_file = feature_settings(folder)
    config = config_from_hf(hf_config, source, read_json_object(folder / "generation_config.json"), features,
                            features_file)
    model = SpeechToText(config)
    tied = {LM_HEAD[0]} if config.tie_word_embeddings else set()
    assign_weights(model, read_weights(folder), key_rows(config), folder / "model.safetensors", optional=tied)
    if HFTokenizer.saved_in(folder) or (folder / "tokenizer.json").is_file():
        model.tokenizer = HFTokenizer.from_folder(folder)
    return model.eval()


def config_to_hf(config: SpeechToTextConfig) -> tuple[dict, dict, dict]:
    """config.json, generation_config.json and the feature extractor's settings of `config`."""
    if config.norm_eps != 1e-5:
        raise ValueError(f"norm_eps {config.norm_eps}: WhisperForConditionalGeneration's LayerNorms use 1e-5")
    act = {ours: hf for hf, ours in ACTIVATIONS.items() if hf in ("gelu", "gelu_new", "relu", "silu", "quick_gelu")}
    hf = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": config.vocab_size,
        "num_mel_bins": config.n_mels, "d_model": config.width,
        "encoder_layers": config.encoder_depth, "encoder_attention_heads": config.encoder_heads,
        "encoder_ffn_dim": config.encoder_mlp, "decoder_layers": config.decoder_depth,
        "decoder_attention_heads": config.decoder_heads, "decoder_ffn_dim": config.decoder_mlp,
        "max_source_positions": config.max_source_positions, "max_target_positions": config.max_target_positions,
        "activation_function": act[config.act], "scale_embedding": False,
        "tie_word_embeddings": config.tie_word_embeddings, "pad_token_id": config.pad_token_id,
        "bos_token_id": config.eos_token_id, "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id, "suppress_tokens": list(config.suppress_tokens),
        "begin_suppress_tokens": list(config.begin_suppress_tokens), "use_cache": True, "dtype": "float32",
    }
    generation = {
        "decoder_start_token_id": config.decoder_start_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.eos_token_id, "max_length": config.max_length,
        "suppress_tokens": list(config.suppress_tokens), "begin_suppress_tokens": list(config.begin_suppress_tokens),
    }
    if config.forced_decoder_ids:
        generation["forced_decoder_ids"] = [list(p) for p in config.forced_decoder_ids]
    if config.no_timestamps_token_id is not None:
        generation["no_timestamps_token_id"] = config.no_timestamps_token_id
    if config.language_tokens:
        generation["lang_to_id"] = dict(config.language_tokens)
    if config.task_tokens:
        generation["task_to_id"] = dict(config.task_tokens)
    if config.is_multilingual is not None:
        generation["is_multilingual"] = config.is_multilingual
    samples = config.chunk_length * config.sampling_rate
    features = {
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": config.n_mels,
        "sampling_rate": config.sampling_rate, "hop_length": config.hop_length, "chunk_length": config.chunk_length,
        "n_fft": config.n_fft, "n_samples": samples, "nb_max_frames": samples // config.hop_length,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "dither": 0.0,
    }
    return hf, generation, features


def export_whisper(model: SpeechToText, directory: str | os.PathLike) -> Path:
    """Write `model` as a WhisperForConditionalGeneration folder that transformers' model and
    WhisperProcessor load: config.json, model.safetensors, generation_config.json,
    processor_config.json (the feature extractor, nested as transformers 5 writes it) and the tokenizer."""
    if not isinstance(model, SpeechToText) or type(model) is not SpeechToText:
        raise WrongModelError(f"a {getattr(model, 'model_type', type(model).__name__)} model has no Whisper layout")
    from safetensors.torch import save_file

    hf, generation, features = config_to_hf(model.config)
    tensors = export_tensors(model, key_rows(model.config))
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        processor = {"feature_extractor": features, "processor_class": "WhisperProcessor"}
        (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer.json")
    return directory
