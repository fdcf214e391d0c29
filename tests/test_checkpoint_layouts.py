"""Checkpoints as the installed transformers writes them, and those we do not read.

Every supported family (CLIP, SigLIP with a tokenizer.json or only its SentencePiece model, LLaVA,
Idefics3, SmolVLM) is saved here by transformers itself, model and processor both, as a user of
transformers 5 publishes a checkpoint; the test says which files transformers wrote (processor_config.json with the image settings nested under
"image_processor" and no preprocessor_config.json, chat_template.jinja), loads the folder with
our loaders and demands transformers' numbers. The same folder rewritten in the 4.x layout
(preprocessor_config.json, the chat template in tokenizer_config.json or chat_template.json)
gives the same numbers. A layout we do not read is refused with the list of those we do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import multimodal_models
from multimodal_models.errors import DataFormatError

from .test_pretrained_clip import TEXTS, make_clip, make_siglip, random_images, siglip_sentencepiece_tokenizer
from .test_pretrained_vlm import (
    assert_same_forward,
    assert_same_greedy,
    hf_processor,
    make_idefics3,
    make_llava,
    random_image,
)

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# -- layouts we do not read --------------------------------------------------------------------------


def test_an_unsupported_layout_is_refused_with_the_layouts_we_read(tmp_path):
    config = transformers.Qwen2VLConfig(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         vocab_size=64),
                                        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2))
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(DataFormatError) as error:
        multimodal_models.load(tmp_path)
    message = str(error.value)
    assert "config.json" in message and "model_type 'qwen2_vl' (Qwen2VLForConditionalGeneration)" in message
    for layout in ("clip (CLIPModel)", "siglip (SiglipModel)", "llava (LlavaForConditionalGeneration)",
                   "idefics3 (Idefics3ForConditionalGeneration)", "smolvlm (SmolVLMForConditionalGeneration)"):
        assert layout in message
    assert "the model types it saves: " in message and "dual_encoder" in message and "vlm" in message

    from multimodal_models.pretrained import load_hf

    with pytest.raises(DataFormatError, match="Hugging Face layouts it reads: clip \\(CLIPModel\\)"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(DataFormatError, match="is a llava checkpoint, not a CLIPModel or SiglipModel"):
        load_hf(tmp_path)


# -- every family as transformers saves it -----------------------------------------------------------

VLM_FAMILIES = ("llava", "idefics3", "smolvlm")


def save_with_transformers(family: str, folder: Path):
    """A tiny random checkpoint of `family`, model and processor saved by transformers' save_pretrained
    (SmolVLM's own processor needs torchvision for its video half: it is saved by Idefics3Processor,
    the same image and text processing). Returns transformers' model."""
    if family == "siglip-sentencepiece":  # as google/siglip-* ship: a SentencePiece model, no tokenizer.json
        slow = siglip_sentencepiece_tokenizer(folder.parent / "spiece")
        source, reference, tokenizer, image_processor = make_siglip(folder.parent / f"{family}-src", tokenizer=slow)
        reference.save_pretrained(folder)
        transformers.SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
        return reference
    if family in ("clip", "siglip"):
        make = make_clip if family == "clip" else make_siglip
        source, reference, tokenizer, image_processor = make(folder.parent / f"{family}-src")
        processor_class = transformers.CLIPProcessor if family == "clip" else transformers.SiglipProcessor
        reference.save_pretrained(folder)
        processor_class(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
        return reference
    if family == "llava":
        source, reference = make_llava(folder.parent / "llava-src", "llama-clip")
    else:
        source, reference = make_idefics3(folder.parent / f"{family}-src", splitting=True, model_type=family)
    reference.save_pretrained(folder)
    hf_processor(source, "llava" if family == "llava" else "idefics3").save_pretrained(folder)
    return reference


def as_transformers_4_wrote_it(folder: Path, target: Path, *, template_in: str) -> Path:
    """The same checkpoint in transformers 4.x's layout: the image settings in preprocessor_config.json,
    the chat template in chat_template.json or tokenizer_config.json."""
    shutil.copytree(folder, target)
    processor = json.loads((target / "processor_config.json").read_text())
    image = processor.pop("image_processor")
    (target / "preprocessor_config.json").write_text(json.dumps({**image, "processor_class": processor["processor_class"]}))
    (target / "processor_config.json").write_text(json.dumps(processor))
    template_file = target / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()
        template_file.unlink()
        if template_in == "chat_template.json":
            (target / "chat_template.json").write_text(json.dumps({"chat_template": template}))
        else:
            config = json.loads((target / "tokenizer_config.json").read_text())
            (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return target


def assert_same_numbers(family: str, model, reference, processor) -> None:
    """Our model on our preprocessing equals transformers' model on transformers' processor."""
    if family in VLM_FAMILIES:
        images = [random_image(70, 45, 7)]
        inputs = assert_same_forward(model, reference, images, processor)
        assert_same_greedy(model, reference, inputs, images)
        return
    images = random_images()
    siglip = family.startswith("siglip")
    padding = dict(padding="max_length", max_length=64) if siglip else dict(padding=True)
    inputs = processor(text=TEXTS, images=images, return_tensors="pt", **padding)
    if siglip:
        inputs.pop("attention_mask", None)  # SigLIP attends to its padding
    with torch.no_grad():
        expected = reference(**inputs)
    torch.testing.assert_close(model.embed_images(images), expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.embed_texts(TEXTS), expected.text_embeds, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip-sentencepiece", *VLM_FAMILIES])
def test_checkpoints_saved_by_transformers_load_in_both_layouts(family, tmp_path):
    folder = tmp_path / "saved"
    reference = save_with_transformers(family, folder)
    files = {path.name for path in folder.iterdir()}
    # what the installed transformers (5.x) writes: the image settings nested in processor_config.json
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json"} <= files
    tokenizer_file = "spiece.model" if family == "siglip-sentencepiece" else "tokenizer.json"
    assert tokenizer_file in files and ("tokenizer.json" in files) == (tokenizer_file == "tokenizer.json")
    assert "preprocessor_config.json" not in files
    nested = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    assert nested["image_processor_type"].startswith(("CLIP", "Siglip", "Idefics3"))
    if family in VLM_FAMILIES:  # the chat template in its own file, not in tokenizer_config.json
        assert "chat_template.jinja" in files
        assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = multimodal_models.load(folder)
    assert model.image_processor is not None and model.tokenizer is not None
    assert_same_numbers(family, model, reference, processor)

    # the same checkpoint as transformers 4.x wrote it
    for template_in in ("chat_template.json", "tokenizer_config.json"):
        old = as_transformers_4_wrote_it(folder, tmp_path / f"4.x-{template_in}", template_in=template_in)
        assert_same_numbers(family, multimodal_models.load(old), reference, processor)
        if family not in VLM_FAMILIES:
            break


def test_a_folder_without_image_settings_names_both_places(tmp_path):
    folder = tmp_path / "saved"
    save_with_transformers("llava", folder)
    config = json.loads((folder / "processor_config.json").read_text())
    del config["image_processor"]
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json not found \\(nor an \"image_processor\" "
                                                "object in processor_config.json"):
        multimodal_models.load(folder)
    config["image_processor"] = {"image_processor_type": "CLIPImageProcessor", "do_pan_and_scan": True}
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(DataFormatError, match="processor_config.json \\(its image_processor object\\), field "
                                              "'do_pan_and_scan': unsupported setting"):
        multimodal_models.load(folder)
