"""LLaVA checkpoints (transformers' LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-7b-hf,
llava-hf/llava-interleave-qwen-0.5b-hf) as our VisionLanguageModel, and back.

The LLaVA layout in our terms:
- vision tower: a CLIP or SigLIP vision transformer (the key tables and config translation of
  `clip` / `siglip`); the features are the hidden states of `vision_feature_layer`
  (transformers counts the embeddings as hidden state 0, so its layer k > 0 is our block k - 1
  and its negative indices are ours) with, for vision_feature_select_strategy "default", the
  first token dropped (vision_tokens="skip_first") and for "full" every token kept;
- multi_modal_projector: linear_1 -> projector_hidden_act -> linear_2, biases when
  multimodal_projector_bias (our "mlp" projector, no pixel shuffle);
- language model: Llama or Qwen2 (`llama`), lm_head tied to the embeddings when either the
  top-level or the text config's tie_word_embeddings says so (as transformers' LlavaConfig reads
  them), unless a stored lm_head differs from the embeddings: then it is used, as transformers does;
- prompt: the checkpoint's chat template, each <image> expanded to tokens_per_image image
  tokens (processor_config.json's patch_size / num_additional_image_tokens / strategy must
  agree); pixels: the image processor's settings read by our ImageProcessor (CLIPImageProcessor /
  SiglipImageProcessor), from preprocessor_config.json (transformers 4.x) or from the
  "image_processor" object of processor_config.json (transformers 5 writes them only there).

Key table (HF key as stored on the hub -> ours); transformers 5's in-memory names
(model.language_model.*, model.vision_tower.*, lm_head.weight, vision_tower without
vision_model.) are normalised to these first:

    vision_tower.vision_model.<CLIP/SigLIP vision key>     vision.<ours>   (clip.KEY_MAP / siglip.KEY_MAP)
    multi_modal_projector.linear_1.{weight,bias}           projector.layers.0.{weight,bias}
    multi_modal_projector.linear_2.{weight,bias}           projector.layers.2.{weight,bias}
    language_model.model.<Llama key>                       decoder.<ours>  (llama.decoder_rows)
    language_model.lm_head.weight                          decoder.lm_head.weight (untied only)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from safetensors.torch import save_file

from ..data.hf_tokenizer import HFTokenizer, read_json_object
from ..data.idefics3 import image_processor_config, load_image_processor, missing_image_processor
from ..data.preprocess import ImageProcessor
from ..errors import DataFormatError, WrongModelError
from ..models.dual_encoder import DualEncoderConfig
from ..models.pretrained import atomic_directory
from ..models.vision import VisionConfig
from ..models.vlm import VisionLanguageModel, VLMConfig
from . import clip, siglip
from .checkpoint import read_weights
from .llama import (HF_ACTIVATIONS, activation_name, decoder_config, decoder_rows, decoder_to_hf_config,
                    stored_head_tied)
from .weights import assign_weights, expand_rows, export_tensors, rename_keys

ARCHITECTURE = "LlavaForConditionalGeneration"
MODEL_TYPE = "llava"
VISION_FAMILIES = {"clip_vision_model": clip, "siglip_vision_model": siglip}
# LlavaConfig's vision tower when config.json has no vision_config (llava-1.5's CLIP ViT-L/14-336).
DEFAULT_VISION = {"model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
                  "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}
PROJECTOR_ROWS = [("multi_modal_projector.linear_1.weight", "projector.layers.0.weight", None),
                  ("multi_modal_projector.linear_2.weight", "projector.layers.2.weight", None)]
PROJECTOR_BIAS_ROWS = [("multi_modal_projector.linear_1.bias", "projector.layers.0.bias", None),
                       ("multi_modal_projector.linear_2.bias", "projector.layers.2.bias", None)]


# -- configs ----------------------------------------------------------------------------------


def vision_family(vision: dict, source: Path, field: str = "vision_config"):
    kind = vision.get("model_type", "clip_vision_model")
    if kind not in VISION_FAMILIES:
        raise DataFormatError(source, f"vision tower {kind!r} is not supported; expected one of "
                                      f"{sorted(VISION_FAMILIES)}", field=f"{field}.model_type")
    return VISION_FAMILIES[kind]


def vision_config(vision: dict, source: Path, field: str = "vision_config") -> VisionConfig:
    """Our VisionConfig for a CLIP / SigLIP vision_config dict (the clip / siglip translations).
    A SigLIP tower without its attention-pooling head (vision_use_head=false) pools by the mean,
    which nothing here reads."""
    family = vision_family(vision, source, field)
    if family is siglip:
        use_head = vision.get("vision_use_head", True)
        width = vision.get("hidden_size", siglip.VISION_DEFAULTS["hidden_size"])  # a text tower of the same width
        config = siglip.config_from_hf({"vision_config": {**vision, "vision_use_head": True},
                                        "text_config": {"hidden_size": width}}, source).vision
        return config if use_head else dataclasses.replace(config, pool="mean")
    return clip.config_from_hf({"vision_config": vision}, source).vision


def vision_rows(family, config: VisionConfig, hf_prefix: str) -> list[tuple[str, str, str | None]]:
    """The vision tower's rows of the family's key table, under `hf_prefix` (HF "vision_model." keys
    become hf_prefix + "vision_model."), without the pooling head when the tower has none."""
    rows = [entry for entry in family.KEY_MAP if entry[1].startswith("vision.")]
    if config.pool != "map":
        rows = [entry for entry in rows if not entry[1].startswith("vision.pool_head.")]
    return expand_rows(rows, config.depth, hf_prefix)


def our_vision_layer(hf_layer, depth: int, source: Path) -> int:
    """transformers' hidden-state index (0 = the embeddings) -> our block index (negative from the end)."""
    if not isinstance(hf_layer, int) or isinstance(hf_layer, bool):
        raise DataFormatError(source, f"only one vision feature layer is supported, got {hf_layer!r}",
                              field="vision_feature_layer")
    if hf_layer > 0 and hf_layer <= depth:
        return hf_layer - 1
    if -depth <= hf_layer < 0:
        return hf_layer
    raise DataFormatError(source, f"vision_feature_layer {hf_layer} is the embeddings or outside a tower of "
                                  f"{depth} layers; only a transformer layer's output is supported",
                          field="vision_feature_layer")


def stop_token_ids(folder: Path, hf_config: dict) -> tuple[int, ...]:
    """Ids that end a reply: generation_config.json's eos_token_id, else the text config's."""
    ids = []
    generation = folder / "generation_config.json"
    for source in ([json.loads(generation.read_text(encoding="utf-8"))] if generation.is_file() else []) + [
            hf_config.get("text_config") or {}, hf_config]:
        value = source.get("eos_token_id")
        ids += [value] if isinstance(value, int) else [v for v in value or () if isinstance(v, int)]
    return tuple(dict.fromkeys(ids))


def config_from_hf(hf: dict, folder: Path) -> VLMConfig:
    source = folder / "config.json"
    vision = hf.get("vision_config") or DEFAULT_VISION
    text = hf.get("text_config") or {"model_type": "llama"}
    # transformers' LlavaConfig takes the text config's flag when the top-level one is false
    tie = bool(hf.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    vision_cfg = vision_config(vision, source)
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise DataFormatError(source, f"unknown strategy {strategy!r}; expected 'default' or 'full'",
                              field="vision_feature_select_strategy")
    image_token_id = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return VLMConfig(
        vision=vision_cfg,
        decoder=decoder_config(text, tie_embeddings=tie, source=str(source)),
        pixel_shuffle=1,
        projector="mlp",
        projector_act=activation_name(hf.get("projector_hidden_act", "gelu"), str(source), "projector_hidden_act"),
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        image_token_id=int(image_token_id),
        vision_layer=our_vision_layer(hf.get("vision_feature_layer", -2), vision_cfg.depth, source),
        vision_tokens="skip_first" if strategy == "default" else "all",
        chat_format="jinja",
        image_token="<image>",
        image_prompt="repeat",
        stop_token_ids=stop_token_ids(folder, hf),
    )


# -- weights ----------------------------------------------------------------------------------


def hub_key(key: str) -> str:
    """Any LLaVA key spelling -> the hub's (legacy) one this module's table uses."""
    for old, new in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(old):
            key = new + key[len(old):]
    if key == "lm_head.weight":
        key = "language_model.lm_head.weight"
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def key_rows(config: VLMConfig, hf_vision: dict, source: Path) -> list[tuple[str, str, str | None]]:
    """Every (HF key, our key, shape rule) of a LLaVA checkpoint with this config."""
    rows = vision_rows(vision_family(hf_vision, source), config.vision, "vision_tower.")
    rows += PROJECTOR_ROWS + (PROJECTOR_BIAS_ROWS if config.projector_bias else [])
    return rows + decoder_rows(config.decoder, "language_model.model.", "language_model.lm_head.weight")


# -- the whole model --------------------------------------------------------------------------


def load_llava(folder: str | os.PathLike, hf_config: dict | None = None) -> VisionLanguageModel:
    """Our VisionLanguageModel from a LLaVA folder (eval mode, tokenizer and image processor attached)."""
    folder = Path(folder)
    hf = hf_config if hf_config is not None else json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = config_from_hf(hf, folder)
    source = folder / "model.safetensors"
    tensors = rename_keys(read_weights(folder), hub_key, source)
    tie = stored_head_tied(config.decoder.tie_embeddings, tensors, "language_model.model.embed_tokens.weight",
                           "language_model.lm_head.weight", source)
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, tie_embeddings=tie))
    model = VisionLanguageModel(config)
    optional = {"vision_tower.vision_model.embeddings.position_ids"}
    if config.decoder.tie_embeddings:
        optional.add("language_model.lm_head.weight")
    assign_weights(model, tensors, key_rows(config, hf.get("vision_config") or DEFAULT_VISION, folder / "config.json"),
                   source, optional=optional)
    attach_checkpoint_preprocessing(model, folder)
    processor = read_json_object(folder / "processor_config.json") or {}
    if processor.get("image_token"):
        model.config.image_token = processor["image_token"]
    check_image_tokens(model, processor, folder)
    check_image_token_id(model, folder)
    return model.eval()


def check_image_token_id(model: VisionLanguageModel, folder: Path) -> None:
    """The prompt's image placeholder must be one token, the id config.json names."""
    ids = model.tokenizer.encode(model.config.image_token)
    if ids != [model.config.image_token_id]:
        raise DataFormatError(folder / "config.json", f"the image token {model.config.image_token!r} is {ids} in "
                              f"tokenizer.json, not the single id {model.config.image_token_id} config.json names",
                              field="image_token_index")


def check_image_tokens(model: VisionLanguageModel, processor: dict, folder: Path) -> None:
    """processor_config.json, when it says, must expand an image to the count the model consumes."""
    patch = processor.get("patch_size")
    if not patch:
        return
    side = model.config.vision.image_size
    count = (side // patch) ** 2 + int(processor.get("num_additional_image_tokens", 0))
    if processor.get("vision_feature_select_strategy", "default") == "default":
        count -= 1
    if count != model.config.tokens_per_image:
        raise DataFormatError(folder / "processor_config.json", f"expands an image to {count} tokens but the model "
                              f"reads {model.config.tokens_per_image} image features per image")


def attach_checkpoint_preprocessing(model: VisionLanguageModel, folder: Path, image_processor=None) -> None:
    """The tokenizer (HFTokenizer) with the processor's chat template, and the image processor."""
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'} not found: a vision-language model needs its tokenizer")
    model.tokenizer = HFTokenizer.from_folder(folder)
    template = processor_chat_template(folder)
    if template:  # the processor's template is the one transformers applies to multimodal chats
        model.tokenizer.chat_template = template
        model.tokenizer.config["chat_template"] = template
    if image_processor is not None:
        model.image_processor = image_processor
        return
    image_processor = load_image_processor(folder)  # preprocessor_config.json, or processor_config.json's
    if image_processor is None:
        raise missing_image_processor(folder)
    source = image_processor_config(folder)[1]
    if not isinstance(image_processor, ImageProcessor):
        raise DataFormatError(source, f"a {type(image_processor).__name__} where a CLIP or SigLIP image processor "
                                      "was expected", field="image_processor_type")
    model.image_processor = image_processor
    height, width = image_processor.output_size(1000, 1000)
    side = model.config.vision.image_size
    if image_processor.do_center_crop or "height" in image_processor.size:
        if (height, width) != (side, side):
            raise DataFormatError(source, f"makes {height}x{width} pixels but the vision tower reads {side}x{side}")


def processor_chat_template(folder: Path) -> str | None:
    """chat_template.jinja, or chat_template.json's "chat_template" (a processor's own template)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return (read_json_object(folder / "chat_template.json") or {}).get("chat_template")


# -- export -------------------------------------------------------------------------------------


def config_to_hf(config: VLMConfig) -> dict:
    """A LlavaForConditionalGeneration config.json for our config; refuses what LLaVA cannot hold."""
    if config.projector != "mlp" or config.pixel_shuffle != 1:
        raise ValueError("only an 'mlp' projector without pixel shuffle is a LLaVA projector")
    if config.vision_tokens == "patches" and config.vision.class_token is False:
        raise ValueError("LLaVA drops the first token or keeps all; vision_tokens='patches' without a class token "
                         "keeps all, so set vision_tokens='all'")
    vision = config.vision
    if vision.class_token and vision.pre_norm and vision.final_norm == "pooled":
        family = clip
    elif not vision.class_token and not vision.pre_norm and vision.final_norm == "all":
        family = siglip
    else:
        raise ValueError("the vision tower is neither CLIP- nor SigLIP-shaped")
    pool = "cls" if family is clip else vision.pool
    hf_vision = family.config_to_hf(DualEncoderConfig(vision=dataclasses.replace(vision, pool=pool),
                                                      embed_dim=vision.width))["vision_config"]
    if family is siglip:
        hf_vision["vision_use_head"] = vision.pool == "map"
    back = vision_config(hf_vision, Path("<export>"))
    if family is clip:  # CLIP's pooling has no weights and LLaVA never reads the pooled vector
        back = dataclasses.replace(back, pool=vision.pool)
    if effective_vision(back) != effective_vision(vision):
        raise ValueError(f"the vision tower cannot be written as a {hf_vision['model_type']}: ours {vision}, "
                         f"theirs {back}")
    layer = config.vision_layer
    if layer is None:
        if vision.final_norm == "all":
            raise ValueError("LLaVA reads a layer before the final norm; set vision_layer")
        layer = -1
    kind = "qwen2" if config.decoder.qkv_bias and not config.decoder.out_bias else "llama"
    hf_act = {ours: theirs for theirs, ours in HF_ACTIVATIONS.items() if theirs in ("gelu", "gelu_pytorch_tanh",
                                                                                    "quick_gelu", "silu", "relu")}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "dtype": "float32",
        "image_token_index": config.image_token_id,
        "image_seq_length": config.tokens_per_image,
        "projector_hidden_act": hf_act[config.projector_act],
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": layer + 1 if layer >= 0 else layer,
        "vision_feature_select_strategy": "full" if config.vision_tokens == "all" else "default",
        "tie_word_embeddings": config.decoder.tie_embeddings,
        "text_config": decoder_to_hf_config(config.decoder, kind),
        "vision_config": hf_vision,
    }


def effective_vision(vision: VisionConfig) -> dict:
    data = dataclasses.asdict(vision)
    data["mlp_hidden"] = data["mlp_hidden"] or int(data["width"] * data["mlp_ratio"])
    for inert in ("mlp_ratio", "dropout"):
        data.pop(inert)
    return data


def export_llava(model: VisionLanguageModel, directory: str | os.PathLike) -> Path:
    """Write `model` as a LLaVA folder (hub key names) that transformers' LlavaForConditionalGeneration
    and AutoProcessor load: config.json, model.safetensors, generation_config.json, the tokenizer
    files, chat_template.jinja, preprocessor_config.json and processor_config.json."""
    check_plain_vlm(model)
    hf = config_to_hf(model.config)
    rows = key_rows(model.config, hf["vision_config"], Path("<export>"))
    processor = {"processor_class": "LlavaProcessor", "image_token": model.config.image_token,
                 "patch_size": model.config.vision.patch_size,
                 "vision_feature_select_strategy": hf["vision_feature_select_strategy"],
                 "num_additional_image_tokens": int(model.config.vision.class_token)}
    return write_vlm_folder(model, directory, hf, export_tensors(model, rows), processor, nest_image_processor=False)


def check_plain_vlm(model: VisionLanguageModel) -> None:
    """Only VisionLanguageModel itself has a Hugging Face layout: a subclass computes its image features or
    decoder steps its own way (ShapesVLM's object tokens and image readers), which no transformers class runs."""
    if type(model) is not VisionLanguageModel:
        raise WrongModelError(f"a {getattr(model, 'model_type', type(model).__name__)} model has no Hugging Face "
                              f"layout ({type(model).__name__} overrides how a VisionLanguageModel reads images): "
                              "--format hf writes dual encoders (CLIP, SigLIP) and VLMs (LLaVA, Idefics3)")


def write_vlm_folder(model: VisionLanguageModel, directory: str | os.PathLike, hf_config: dict,
                     tensors: dict, processor: dict, *, nest_image_processor: bool) -> Path:
    """The files of an exported VLM (shared by the LLaVA and Idefics3 writers), written atomically:
    config.json, model.safetensors, generation_config.json (the stop ids), tokenizer.json +
    tokenizer_config.json, chat_template.jinja (where transformers' processors look for theirs) and
    processor_config.json (`processor`). The image processor's settings go under processor_config.json's
    "image_processor" (nest_image_processor: as transformers 5 writes them) or into
    preprocessor_config.json (as transformers 4.x did; 5.x reads that too)."""
    directory = Path(directory)
    processor = dict(processor)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.config.stop_token_ids:
            generation = {"eos_token_id": list(model.config.stop_token_ids)}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer.json")
            template = getattr(model.tokenizer, "chat_template", None)
            if isinstance(template, str):  # where transformers' processors look for theirs
                (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        if model.image_processor is not None:
            settings = model.image_processor.to_dict()
            if nest_image_processor:
                processor = {"image_processor": settings, **processor}
            else:
                settings["processor_class"] = processor["processor_class"]
                (tmp / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    return directory
