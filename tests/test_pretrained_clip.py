"""Hugging Face CLIP and SigLIP checkpoints in our modules: the same numbers as transformers.

Tiny random CLIPModel / SiglipModel (width 32, 2 layers, 32x32 images, 8x8 patches) are
built with transformers, saved with their tokenizer and image processor, loaded by our code
and compared: token ids, pixels, embeddings and logits (within 1e-5 in float32), the prompt
ensemble of zero-shot classification, export back to the Hugging Face layout, and the errors
for bad weights and for an unreachable hub. No network is used.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

import multimodal_models
from multimodal_models.errors import DataFormatError
from multimodal_models.models.dual_encoder import DualEncoder, DualEncoderConfig
from multimodal_models.models.inputs import tokenize
from multimodal_models.models.text import TextEncoderConfig
from multimodal_models.models.vision import VisionConfig
from multimodal_models.pretrained import (
    CLIP_IMAGENET_TEMPLATES,
    CLIP_IMAGENET_TEMPLATES_7,
    HFTokenizer,
    HubDownloadError,
    export_hf,
    resolve_checkpoint,
)

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=0)
TEXTS = ["a photo of a cat.", "dog", "A Photo of the DOG!", "cat cat cat"]
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
IMAGE = dict(image_size=32, patch_size=8)


def random_images(seed: int = 0) -> list[Image.Image]:
    """Photos of several shapes and sizes (landscape, portrait, small, square)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            [(50, 40), (30, 61), (20, 20), (33, 33)]]


def clip_tokenizer():
    """A tiny CLIP BPE: byte-level letters, word-final "</w>" pieces and a few merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in list("abcdefghijklmnopqrstuvwxyz.!") + [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz.!"]:
        vocab[piece] = len(vocab)
    merges = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>"),
              ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def siglip_tokenizer():
    """A tiny word-level tokenizer that appends </s> and pads with it, as SigLIP's does."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in "a photo of the cat dog . ! bad many art".split():
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>",
                                                unk_token="<unk>", add_eos_token=True, model_max_length=64)


def make_clip(folder):
    """A tiny random CLIPModel with its tokenizer and image processor, each saved by transformers."""
    tokenizer = clip_tokenizer()
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **TINY_TOWER, **ids),
        vision_config=dict(**TINY_TOWER, **IMAGE), projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, tokenizer, processor


def make_siglip(folder, tokenizer=None):
    """A tiny random SiglipModel with its tokenizer (default: a fast word-level one) and image processor."""
    tokenizer = tokenizer if tokenizer is not None else siglip_tokenizer()
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=64, **TINY_TOWER,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None),
        vision_config=dict(**TINY_TOWER, **IMAGE))
    torch.manual_seed(1)
    model = transformers.SiglipModel(config).eval()
    processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, tokenizer, processor


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory):
    return make_siglip(tmp_path_factory.mktemp("siglip"))


def hf_text_inputs(family: str, tokenizer, texts) -> dict:
    """What each checkpoint's processor gives its model: CLIP pads to the longest with a mask,
    SigLIP pads to max_length and the model reads the ids alone."""
    if family == "clip":
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))
    return {"input_ids": tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")["input_ids"]}


def hf_outputs(model, text_inputs: dict, pixels: torch.Tensor):
    with torch.no_grad():
        return model(pixel_values=pixels, **text_inputs)


@pytest.fixture(params=["clip", "siglip"])
def checkpoint(request, clip_checkpoint, siglip_checkpoint):
    return request.param, *(clip_checkpoint if request.param == "clip" else siglip_checkpoint)


# -- loading: the same ids, pixels, embeddings and logits ------------------------------------------


def test_loads_with_same_tokens_pixels_embeddings_and_logits(checkpoint):
    family, folder, hf_model, hf_tokenizer, hf_processor = checkpoint
    model = multimodal_models.load(folder)
    assert isinstance(model, DualEncoder) and isinstance(model.tokenizer, HFTokenizer) and not model.training

    text_inputs = hf_text_inputs(family, hf_tokenizer, TEXTS)
    ids, mask = tokenize(model.tokenizer, TEXTS, model.config.text.max_length, padding=model.config.text.padding)
    assert torch.equal(ids, text_inputs["input_ids"])
    if family == "clip":
        assert torch.equal(mask, text_inputs["attention_mask"])
    else:
        assert model.config.text.padding == "max_length" and bool(mask.all())

    images = random_images()
    pixels = model.image_processor(images)
    reference_pixels = hf_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, reference_pixels)

    expected = hf_outputs(hf_model, text_inputs, reference_pixels)
    with torch.no_grad():
        ours = model(pixels, ids, mask)
    torch.testing.assert_close(ours.image_embeds, expected.image_embeds, **TOL)
    torch.testing.assert_close(ours.text_embeds, expected.text_embeds, **TOL)
    torch.testing.assert_close(ours.logits_per_image, expected.logits_per_image, **TOL)
    # the user-level helpers: files in, unit vectors out
    torch.testing.assert_close(model.embed_images(images), expected.image_embeds, **TOL)
    torch.testing.assert_close(model.embed_texts(TEXTS), expected.text_embeds, **TOL)


def test_clip_legacy_eos_id_pools_at_the_highest_id(clip_checkpoint, tmp_path):
    """Configs written before transformers fixed eos_token_id (it reads 2) pool at argmax(ids)."""
    folder, _, hf_tokenizer, _ = clip_checkpoint
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (legacy / "config.json").write_text(json.dumps(config))
    model = multimodal_models.load(legacy)
    assert model.config.text.pool == "argmax"
    hf_model = transformers.CLIPModel.from_pretrained(legacy).eval()
    inputs = hf_text_inputs("clip", hf_tokenizer, TEXTS)
    with torch.no_grad():
        expected = hf_model.get_text_features(**inputs).pooler_output
        ours = model.text_projection(model.text(inputs["input_ids"], inputs["attention_mask"]).pooled)
    torch.testing.assert_close(ours, expected, **TOL)


def test_zero_shot_prompt_ensemble_matches_transformers(clip_checkpoint):
    """classify(): the CLIP paper's 80 templates, each label the renormalised mean of its prompts."""
    folder, hf_model, hf_tokenizer, hf_processor = clip_checkpoint
    assert len(CLIP_IMAGENET_TEMPLATES) == 80 == len(set(CLIP_IMAGENET_TEMPLATES))
    assert set(CLIP_IMAGENET_TEMPLATES_7) <= set(CLIP_IMAGENET_TEMPLATES) and len(CLIP_IMAGENET_TEMPLATES_7) == 7
    assert CLIP_IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and CLIP_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    model = multimodal_models.load(folder)
    image, labels = random_images()[0], ["cat", "dog", "photo"]
    probabilities = model.classify(image, labels)

    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        classes = []
        for label in labels:
            prompts = hf_tokenizer([template.format(label) for template in CLIP_IMAGENET_TEMPLATES], padding=True,
                                   return_tensors="pt")
            embeds = hf_model.get_text_features(**prompts).pooler_output
            classes.append(normalize(normalize(embeds, dim=-1).mean(0), dim=-1))
        pixels = hf_processor(image, return_tensors="pt")["pixel_values"]
        image_embed = normalize(hf_model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        expected = (hf_model.logit_scale.exp() * image_embed @ torch.stack(classes).T)[0].softmax(-1)
    assert [label for label, _ in probabilities] == labels
    torch.testing.assert_close(torch.tensor([p for _, p in probabilities]), expected, **TOL)


# -- writing back: the Hugging Face layout and our own ---------------------------------------------


def test_export_to_hf_layout_reloads_in_transformers(checkpoint, tmp_path):
    family, folder, _, hf_tokenizer, hf_processor = checkpoint
    model = multimodal_models.load(folder)
    out = export_hf(model, tmp_path / "exported")
    hf_class = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    reloaded = hf_class.from_pretrained(out).eval()
    images = random_images(seed=3)
    pixels = hf_processor(images, return_tensors="pt")["pixel_values"]
    text_inputs = hf_text_inputs(family, hf_tokenizer, TEXTS)
    expected = hf_outputs(reloaded, text_inputs, pixels)
    with torch.no_grad():
        ours = model(pixels, text_inputs["input_ids"], text_inputs.get("attention_mask"))
    torch.testing.assert_close(ours.logits_per_image, expected.logits_per_image, **TOL)
    torch.testing.assert_close(ours.image_embeds, expected.image_embeds, **TOL)
    torch.testing.assert_close(ours.text_embeds, expected.text_embeds, **TOL)
    # tokenizer and preprocessing travel along, and our loader reads the export again
    again = multimodal_models.load(out)
    assert again.tokenizer.encode_batch(TEXTS, add_special_tokens=True) == \
        model.tokenizer.encode_batch(TEXTS, add_special_tokens=True)
    assert again.image_processor == model.image_processor


def test_our_own_layout_keeps_the_hf_tokenizer(checkpoint, tmp_path):
    _, folder, *_ = checkpoint
    model = multimodal_models.load(folder)
    model.save_pretrained(tmp_path / "ours")
    again = multimodal_models.load(tmp_path / "ours")
    assert isinstance(again.tokenizer, HFTokenizer) and again.config == model.config
    torch.testing.assert_close(again.embed_texts(TEXTS), model.embed_texts(TEXTS), atol=0, rtol=0)


def test_export_refuses_a_model_the_layout_cannot_hold(tmp_path):
    # as trained here: mean-pooled patches (CLIP pools its class token), text pooled by the mask ('eot')
    model = DualEncoder(DualEncoderConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2,
                                                              pool="mean"),
                                          text=TextEncoderConfig(vocab_size=50, width=32, depth=1, heads=2)))
    with pytest.raises(ValueError, match=r"cannot be written as a CLIPModel: .*vision.pool is 'mean'.*text.pool"):
        export_hf(model, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


# -- bad weights -----------------------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_keys_are_named(clip_checkpoint, tmp_path):
    folder, *_ = clip_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["text_model.encoder.layers.1.mlp.fc2.bias"]
    tensors["vision_model.extra_head.weight"] = torch.zeros(2)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(DataFormatError, match=r"missing keys: text_model\.encoder\.layers\.1\.mlp\.fc2\.bias.*"
                                              r"unexpected keys: vision_model\.extra_head\.weight"):
        multimodal_models.load(broken)

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["visual_projection.weight"] = torch.zeros(24, 31)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(DataFormatError, match=r"visual_projection\.weight.*\(24, 31\).*\(24, 32\)"):
        multimodal_models.load(broken)


# -- tokenizers ------------------------------------------------------------------------------------


def test_hf_tokenizer_decodes_and_saves_like_transformers(clip_checkpoint, tmp_path):
    folder, _, hf_tokenizer, _ = clip_checkpoint
    tokenizer = HFTokenizer.from_folder(folder)
    ids = tokenizer.encode("a photo of the cat.", add_special_tokens=True)
    assert ids == hf_tokenizer("a photo of the cat.")["input_ids"]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (hf_tokenizer.bos_token_id,
                                                                      hf_tokenizer.eos_token_id,
                                                                      hf_tokenizer.pad_token_id)
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == "a photo of the cat ."
    assert tokenizer.model_max_length == 77 and tokenizer.vocab_size == len(hf_tokenizer)
    tokenizer.save(tmp_path / "tok")
    assert HFTokenizer.saved_in(tmp_path / "tok")
    assert HFTokenizer.from_folder(tmp_path / "tok").encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)


def test_special_tokens_come_from_tokenizer_json_as_in_transformers(siglip_checkpoint, tmp_path):
    """tokenizer.json's post-processor decides which special tokens a text gets; transformers 5
    ignores tokenizer_config.json's add_bos_token / add_eos_token next to a tokenizer.json, and so do we."""
    folder, *_ = siglip_checkpoint
    shutil.copytree(folder, tmp_path / "tok")
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens(["<bos>"])
    bos_id = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A </s>", pair="<bos> $A </s> $B </s>", special_tokens=[("<bos>", bos_id), ("</s>", 1)])
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config.update(bos_token="<bos>", add_bos_token=False, add_eos_token=False, chat_template="{{ messages }}")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    ours = HFTokenizer.from_folder(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert ours.encode_batch(TEXTS, add_special_tokens=True) == theirs(TEXTS)["input_ids"]
    assert ours.encode("a cat", add_special_tokens=True) == [bos_id, ours.token_to_id("a"), ours.token_to_id("cat"), 1]
    assert ours.bos_id == bos_id and ours.chat_template == "{{ messages }}"


# -- SigLIP as published: a SentencePiece model, no tokenizer.json --------------------------------------

# Texts that exercise SiglipTokenizer's rules: case, punctuation, runs of whitespace, "▁" typed in the
# text, characters the model lacks, special tokens inside a text (and the spaces beside them), empty text.
SENTENCEPIECE_TEXTS = ["a photo of a cat.", "A Photo of the DOG!", "hello   world", "", "cat</s>dog", "cat </s> dog",
                       " x y z ünïcode ", "a  ▁photo", "<unk>", "the cat <unk> sat", "tab\tand\nnewline",
                       "don't stop-me now", "ÉCOLE", "many dogs and cats play art", "{} is a {}", "a </s>"]


def siglip_sentencepiece_tokenizer(folder):
    """transformers' (slow) SiglipTokenizer over a tiny unigram spiece.model trained here, laid out as
    google/siglip-* (pad 0 "<pad>", eos 1 "</s>", unk 2 "<unk>")."""
    import io

    import sentencepiece

    corpus = ["a photo of a cat", "a photo of a dog", "the cat sat on the mat", "many dogs and cats play art",
              "a bad photo of the big dog", "hello world, this is a test"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=36, model_type="unigram", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0,
        minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return transformers.SiglipTokenizer(str(folder / "spiece.model"))


@pytest.fixture(scope="module")
def siglip_sentencepiece_checkpoint(tmp_path_factory):
    tokenizer = siglip_sentencepiece_tokenizer(tmp_path_factory.mktemp("spiece"))
    return make_siglip(tmp_path_factory.mktemp("siglip-spiece"), tokenizer=tokenizer)


def test_siglip_with_only_its_sentencepiece_model_loads_and_tokenizes_as_transformers(siglip_sentencepiece_checkpoint,
                                                                                     recwarn):
    from multimodal_models.data.hf_tokenizer import SiglipSentencePieceTokenizer

    folder, hf_model, hf_tokenizer, hf_processor = siglip_sentencepiece_checkpoint
    assert (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").exists()
    assert type(transformers.AutoTokenizer.from_pretrained(folder)).__name__ == "SiglipTokenizer"  # no fast one
    model = multimodal_models.load(folder)
    assert not [w for w in recwarn if "tokenizer" in str(w.message)]
    assert isinstance(model.tokenizer, SiglipSentencePieceTokenizer)
    text_inputs = hf_text_inputs("siglip", hf_tokenizer, SENTENCEPIECE_TEXTS)
    ids, _ = tokenize(model.tokenizer, SENTENCEPIECE_TEXTS, model.config.text.max_length, padding="max_length")
    assert torch.equal(ids, text_inputs["input_ids"])
    for text in SENTENCEPIECE_TEXTS:
        encoded = hf_tokenizer(text)["input_ids"]
        assert model.tokenizer.decode(encoded) == hf_tokenizer.decode(encoded, skip_special_tokens=True)
    images = random_images()
    expected = hf_outputs(hf_model, text_inputs, hf_processor(images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(model.embed_texts(SENTENCEPIECE_TEXTS), expected.text_embeds, **TOL)
    torch.testing.assert_close(model.embed_images(images), expected.image_embeds, **TOL)


def test_sentencepiece_added_and_special_tokens_as_their_config_says(siglip_sentencepiece_checkpoint, tmp_path):
    """google/siglip-*'s tokenizer_config.json marks </s> and <unk> lstrip / rstrip (transformers 5 writes
    false); an extra special token (additional_special_tokens) is split off and gets the next id."""
    from multimodal_models.data.hf_tokenizer import SiglipSentencePieceTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(siglip_sentencepiece_checkpoint[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for entry in config["added_tokens_decoder"].values():
        entry["lstrip"] = entry["rstrip"] = True
    config["additional_special_tokens"] = ["<extra_0>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = SiglipSentencePieceTokenizer.from_folder(folder)
    texts = [*SENTENCEPIECE_TEXTS, "a cat <extra_0> a dog", "<extra_0>"]
    assert ours.encode_batch(texts, add_special_tokens=True) == theirs(texts)["input_ids"]
    assert ours.vocab_size == len(theirs) and ours.token_to_id("<extra_0>") == theirs.convert_tokens_to_ids("<extra_0>")


def test_sentencepiece_tokenizer_is_saved_and_exported_as_transformers_reads_it(siglip_sentencepiece_checkpoint,
                                                                                tmp_path):
    from multimodal_models.data.hf_tokenizer import SiglipSentencePieceTokenizer

    folder, _, hf_tokenizer, _ = siglip_sentencepiece_checkpoint
    model = multimodal_models.load(folder)
    expected = hf_tokenizer(SENTENCEPIECE_TEXTS)["input_ids"]
    model.save_pretrained(tmp_path / "ours")
    again = multimodal_models.load(tmp_path / "ours")
    assert isinstance(again.tokenizer, SiglipSentencePieceTokenizer)
    assert again.tokenizer.encode_batch(SENTENCEPIECE_TEXTS, add_special_tokens=True) == expected
    export_hf(model, tmp_path / "export")
    assert (tmp_path / "export" / "spiece.model").is_file()
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert exported(SENTENCEPIECE_TEXTS)["input_ids"] == expected
    # a SentencePiece model of another tokenizer class is refused, naming the class
    config = json.loads((folder / "tokenizer_config.json").read_text())
    shutil.copytree(folder, tmp_path / "t5")
    (tmp_path / "t5" / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(DataFormatError, match="field 'tokenizer_class': a SentencePiece tokenizer of class "
                                              "'T5Tokenizer'"):
        multimodal_models.load(tmp_path / "t5")


# -- the hub, without a network --------------------------------------------------------------------


def test_local_folders_resolve_without_the_hub(clip_checkpoint, tmp_path):
    folder, *_ = clip_checkpoint
    assert resolve_checkpoint(folder) == folder
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_checkpoint(tmp_path)


def test_offline_hub_id_fails_with_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubDownloadError) as error:
        resolve_checkpoint("openai/clip-vit-base-patch32", cache_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot download 'openai/clip-vit-base-patch32': HF_HUB_OFFLINE is set")
    assert "(hf download openai/clip-vit-base-patch32 --local-dir DIR) and pass DIR." in message  # hub >= 0.34's CLI
    with pytest.raises(HubDownloadError, match="cannot download 'mm-tests/no-such-model'"):
        multimodal_models.load("mm-tests/no-such-model")


def test_the_hint_names_the_cli_the_installed_hub_ships(monkeypatch):
    import huggingface_hub

    from multimodal_models.pretrained.hub import hub_commands

    assert hub_commands() == ("hf download", "hf auth login")  # huggingface_hub 2.x has no huggingface-cli
    monkeypatch.setattr(huggingface_hub, "__version__", "0.30.2")
    assert hub_commands() == ("huggingface-cli download", "huggingface-cli login")


def test_unreachable_hub_says_no_network(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(HubDownloadError) as error:
        resolve_checkpoint("openai/clip-vit-base-patch32", cache_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot download 'openai/clip-vit-base-patch32': no network (")
    assert message.endswith("--local-dir DIR) and pass DIR.")


def test_safetensors_reader_equals_the_library_and_names_a_broken_file(clip_checkpoint, tmp_path):
    from multimodal_models.pretrained.checkpoint import read_safetensors

    weights = clip_checkpoint[0] / "model.safetensors"
    ours, reference = read_safetensors(weights), load_file(weights)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k].float() if reference[k].is_floating_point() else reference[k])
               for k in ours)
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="model.safetensors.*truncated or corrupt"):
        read_safetensors(broken)
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(DataFormatError, match="not a readable safetensors file"):
        read_safetensors(broken)


def test_safetensors_reader_reads_every_dtype_floats_cast_to_the_default(tmp_path):
    """F8 (E4M3, E5M2), F16, BF16 and F64 become the default float dtype (bfloat16 under
    load(dtype="bfloat16")); integers, unsigned integers and booleans keep theirs."""
    from multimodal_models.pretrained.checkpoint import read_safetensors

    values = torch.tensor([[0.0, 1.0, 2.0], [-4.0, 0.5, 3.0]])
    floats = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
    integers = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                torch.uint64, torch.bool]
    stored = {str(dtype): values.to(dtype) for dtype in floats}
    stored.update({str(dtype): values.abs().to(dtype) for dtype in integers})
    save_file(stored, str(tmp_path / "all.safetensors"))
    tensors = read_safetensors(tmp_path / "all.safetensors")
    assert tensors.keys() == stored.keys()
    for dtype in floats:
        assert tensors[str(dtype)].dtype == torch.float32 and torch.equal(tensors[str(dtype)], values)
    for dtype in integers:
        assert tensors[str(dtype)].dtype == dtype and torch.equal(tensors[str(dtype)], stored[str(dtype)])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        half = read_safetensors(tmp_path / "all.safetensors")
    finally:
        torch.set_default_dtype(previous)
    assert {half[str(dtype)].dtype for dtype in floats} == {torch.bfloat16}
    assert half["torch.uint16"].dtype == torch.uint16


def test_sharded_checkpoints_load_and_a_missing_shard_is_named(clip_checkpoint, tmp_path):
    folder, hf_model, *_ = clip_checkpoint
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").unlink()
    hf_model.save_pretrained(sharded, max_shard_size="20KB")  # transformers writes the index and the shards
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    model, reference = multimodal_models.load(sharded), multimodal_models.load(folder)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[-1].name} not found: model.safetensors.index.json"):
        multimodal_models.load(sharded)


def test_an_image_size_that_is_not_a_multiple_of_the_patch_loads_as_transformers_runs_it(tmp_path):
    """SigLIP at 384 px with 14 px patches (llava-interleave's tower) drops the pixels past the last whole
    patch; so does ours: here 38 px with 8 px patches, a 4 x 4 grid."""
    from multimodal_models import load

    config = transformers.SiglipConfig(text_config=dict(vocab_size=16, max_position_embeddings=16, **TINY_TOWER),
                                       vision_config=dict(**TINY_TOWER, image_size=38, patch_size=8))
    torch.manual_seed(3)
    theirs = transformers.SiglipModel(config).eval()
    theirs.save_pretrained(tmp_path)
    transformers.SiglipImageProcessorPil(size={"height": 38, "width": 38}).save_pretrained(tmp_path)
    with pytest.warns(UserWarning):  # no tokenizer in this folder: images only
        ours = load(tmp_path)
    pixels = torch.randn(2, 3, 38, 38, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(theirs.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        torch.testing.assert_close(ours.encode_image(pixels), expected, **TOL)
