"""Checkpoints as the installed transformers writes them, and those we do not read.

Every supported family (CLIP, SigLIP, LLaVA, Idefics3, SmolVLM) is saved here by transformers
itself, model and processor both, as a user of transformers 5 publishes a checkpoint; the test
says which files transformers wrote (processor_config.json with the image settings nested under
"image_processor" and no preprocessor_config.json, chat_template.jinja), loads the folder with
our loaders and demands transformers' numbers. The same folder rewritten in the 4.x layout
(preprocessor_config.json, the chat template in tokenizer_config.json or chat_template.json)
gives the same numbers. A layout we do not read is refused with the list of those we do.
"""

from __future__ import annotations

import json

import pytest
import torch

import multimodal_models
from multimodal_models.errors import DataFormatError

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
