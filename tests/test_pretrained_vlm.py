"""LLaVA and Idefics3/SmolVLM checkpoints in the Hugging Face layout, loaded into our VisionLanguageModel:
the same prompt ids, pixels, logits and greedy tokens as transformers on tiny random checkpoints, and
LLaVA exported back to a folder transformers loads to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import multimodal_models
from safetensors.torch import load_file, save_file

from multimodal_models.errors import DataFormatError
from multimodal_models.models.chat import JinjaChatTemplate
from multimodal_models.models.generation import GenerationConfig, generate_tokens
from multimodal_models.models.vlm import VisionLanguageModel, VLMSession
from multimodal_models.pretrained.idefics3 import Idefics3ImageProcessor, idefics3_image_text, patch_position_ids
from multimodal_models.pretrained.llava import export_llava

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

CORPUS = ["what is in the image? a red circle and a blue square.", "describe the picture in one sentence please.",
          "user assistant system: there are two green stars, one small and one large.", "yes no maybe 0 1 2 3"] * 4

# llava-hf/llava-1.5-7b-hf's chat template (renders the images of a message first, {% generation %} blocks)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-interleave-qwen's ChatML template (no bos; no generation blocks)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# HuggingFaceTB/SmolVLM-Instruct's template (starts with the bos token itself)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def write_tokenizer(folder: Path, specials: list[str], *, bos: str | None, eos: str, pad: str, template: str) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) with these special tokens; the
    post-processor adds `bos` in front (as Llama's does). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300 + len(specials), special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad,
              "model_max_length": 512, "chat_template": template}
    if bos is not None:
        config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- checkpoints ---------------------------------------------------------------------------------

LLAVA_CASES = {
    # Llama decoder, CLIP tower, penultimate layer, CLS dropped, untied lm_head, llava-1.5 template
    "llama-clip": dict(text="llama", vision="clip_vision_model", layer=-2, strategy="default", tie=False,
                       template=LLAVA_TEMPLATE),
    # Qwen2 decoder (qkv bias, GQA, rope_theta 1e6, tied), SigLIP tower, last layer, every token kept
    "qwen2-siglip": dict(text="qwen2", vision="siglip_vision_model", layer=-1, strategy="full", tie=True,
                         template=CHATML_TEMPLATE),
}


def make_llava(folder: Path, case: str) -> tuple[Path, torch.nn.Module]:
    c = LLAVA_CASES[case]
    llama = c["text"] == "llama"
    specials = ["<s>", "</s>", "<pad>", "<image>"] if llama else ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    vocab = write_tokenizer(folder, specials, bos="<s>" if llama else None, eos=specials[1] if llama else "<|im_end|>",
                            pad=specials[2] if llama else "<|endoftext|>", template=c["template"])
    image_token_id = specials.index("<image>")
    vision = dict(model_type=c["vision"], hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8, initializer_range=0.2)
    if c["vision"] == "siglip_vision_model":
        vision["vision_use_head"] = False  # as llava-interleave-qwen's tower: no attention-pooling head
    text = dict(model_type=c["text"], hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, initializer_range=0.2,
                tie_word_embeddings=c["tie"], rope_theta=10000.0 if llama else 1e6)
    if not llama:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                      vision_feature_layer=c["layer"], vision_feature_select_strategy=c["strategy"],
                                      tie_word_embeddings=c["tie"])
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    if c["vision"] == "clip_vision_model":
        image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        image_processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.save_pretrained(folder)
    processor = {"processor_class": "LlavaProcessor", "patch_size": 8, "image_token": "<image>",
                 "vision_feature_select_strategy": c["strategy"],
                 "num_additional_image_tokens": int(c["vision"] == "clip_vision_model")}
    (folder / "processor_config.json").write_text(json.dumps(processor))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": c["template"]}))
    return folder, model


def make_idefics3(folder: Path, *, splitting: bool, model_type: str = "idefics3") -> tuple[Path, torch.nn.Module]:
    vocab = write_tokenizer(folder, ["<|endoftext|>", "<|im_start|>"] + IDEFICS3_SPECIALS, bos="<|im_start|>",
                            eos="<end_of_utterance>", pad="<|endoftext|>", template=SMOLVLM_TEMPLATE)
    image_token_id = 3  # "<image>"
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  image_size=40, patch_size=8, initializer_range=0.2)  # a 5 x 5 grid, pixel-shuffled... by 1
    text = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024, initializer_range=0.2,
                rms_norm_eps=1e-5)
    if model_type == "idefics3":
        config = transformers.Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_token_id,
                                             scale_factor=1)
        model_class = transformers.Idefics3ForConditionalGeneration
    else:
        config = transformers.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                                            scale_factor=1)
        model_class = transformers.SmolVLMForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(folder)
    image_processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": 80}, max_image_size={"longest_edge": 40}, do_image_splitting=splitting, resample=1)
    image_processor.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                              "image_seq_len": 25}))
    return folder, model


def make_idefics3_shuffled(folder: Path, *, tie: bool = True, text_tie: bool = True) -> tuple[Path, torch.nn.Module]:
    """scale_factor 2 on a 4 x 4 grid: the pixel-shuffle connector (4 image tokens per tile). tie / text_tie:
    the top-level and the text config's tie_word_embeddings."""
    vocab = write_tokenizer(folder, ["<|endoftext|>", "<|im_start|>"] + IDEFICS3_SPECIALS, bos="<|im_start|>",
                            eos="<end_of_utterance>", pad="<|endoftext|>", template=SMOLVLM_TEMPLATE)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.2)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=vocab, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=text_tie)
    config = transformers.Idefics3Config(vision_config=vision, text_config=text, image_token_id=3, scale_factor=2,
                                         tie_word_embeddings=tie)
    torch.manual_seed(1)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    transformers.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                           resample=1).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                              "image_seq_len": 4}))
    return folder, model


def hf_processor(folder: Path, model_type: str):
    """transformers' own processor for the folder, built from its files (Pil image processors)."""
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    if model_type == "llava":
        image_kind = config["image_processor_type"].replace("ImageProcessor", "ImageProcessorPil")
        image_processor = getattr(transformers, image_kind).from_pretrained(folder)
        extra = json.loads((folder / "processor_config.json").read_text())
        extra.pop("processor_class")
        template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=template, **extra)
    image_processor = transformers.Idefics3ImageProcessorPil.from_pretrained(folder)
    image_seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    return transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                          image_seq_len=image_seq_len, chat_template=SMOLVLM_TEMPLATE)


def conversation(images: list[Image.Image]) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": "what is in the image?"}]}]


def hf_inputs(processor, images: list[Image.Image]) -> dict:
    return processor.apply_chat_template(conversation(images), add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")


def our_ids_and_pixels(model: VisionLanguageModel, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    encoding = model.chat_template().encode(conversation(images), add_generation_prompt=True)
    return torch.tensor([encoding.ids]), model.image_processor(encoding.images)


def assert_same_forward(ours: VisionLanguageModel, theirs, images: list[Image.Image], processor) -> dict:
    """Prompt ids, pixels and logits agree; returns transformers' inputs."""
    inputs = hf_inputs(processor, images)
    ids, pixels = our_ids_and_pixels(ours, images)
    assert ids.tolist() == inputs["input_ids"].tolist()
    theirs_pixels = inputs["pixel_values"].reshape(-1, *pixels.shape[1:])
    assert (pixels - theirs_pixels).abs().max().item() <= 1e-6
    with torch.no_grad():
        expected = theirs(**inputs).logits
        logits = ours(ids, pixels).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    return inputs


def assert_same_greedy(ours: VisionLanguageModel, theirs, inputs: dict, images: list[Image.Image]) -> list[int]:
    """Greedy tokens equal transformers' generate (which stops after emitting a stop id)."""
    template = ours.chat_template()
    stop = sorted(template.stop_ids())
    with torch.no_grad():
        generated = theirs.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=stop,
                                    pad_token_id=stop[0])[0, inputs["input_ids"].shape[1]:].tolist()
    encoding = template.encode(conversation(images), add_generation_prompt=True)
    config = GenerationConfig(max_new_tokens=8)
    session = VLMSession(ours, torch.tensor([encoding.ids]), ours.image_processor(encoding.images), config)
    tokens = list(generate_tokens(session, config, set(stop)))
    assert tokens == [t for t in generated if t not in stop][: len(tokens)]
    assert len(tokens) == 8 or generated[len(tokens)] in stop
    return tokens


# -- LLaVA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(LLAVA_CASES))
def llava(request, tmp_path_factory):
    folder, reference = make_llava(tmp_path_factory.mktemp(f"llava-{request.param}"), request.param)
    return request.param, folder, reference, multimodal_models.load(folder)


def test_llava_matches_transformers(llava):
    case, folder, reference, model = llava
    assert isinstance(model, VisionLanguageModel)
    decoder = model.config.decoder
    assert decoder.tie_embeddings == LLAVA_CASES[case]["tie"] and decoder.kv_heads == 2
    assert (decoder.qkv_bias, decoder.out_bias, decoder.rope_theta) == (
        (False, False, 10000.0) if case == "llama-clip" else (True, False, 1e6))
    assert model.config.tokens_per_image == 16  # 4 x 4 patches (CLIP: + class token - first token)
    processor = hf_processor(folder, "llava")
    images = [random_image(45, 37, 1)]
    inputs = assert_same_forward(model, reference, images, processor)
    tokens = assert_same_greedy(model, reference, inputs, images)
    # the high-level helpers run the same decoding
    assert model.ask(images[0], "what is in the image?", max_new_tokens=8) == model.tokenizer.decode(tokens)
    assert model.answer_batch(["what is in the image?"], images=images, max_new_tokens=8) == [model.tokenizer.decode(tokens)]


def test_llava_two_images_and_turns_match_transformers(llava):
    case, folder, reference, model = llava
    processor = hf_processor(folder, "llava")
    images = [random_image(30, 50, 2), random_image(64, 64, 3)]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "a red?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yes, a circle."}]},
                {"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "and?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    encoding = model.chat_template().encode(messages, add_generation_prompt=True)
    assert encoding.ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([encoding.ids]), model.image_processor(encoding.images)).logits
        expected = reference(**inputs).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    # the assistant's words (and only they) are the training targets
    said = [i for i, t in zip(encoding.ids, encoding.targets) if t]
    assert model.tokenizer.decode(said).strip().startswith("yes, a circle")


def test_llava_export_loads_in_transformers_with_the_same_outputs(llava, tmp_path):
    case, folder, reference, model = llava
    out = export_llava(model, tmp_path / "export")
    again = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = hf_processor(folder, "llava")
    inputs = hf_inputs(processor, [random_image(50, 40, 4)])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, reference(**inputs).logits, atol=1e-6, rtol=0)
    # transformers' AutoProcessor reads the exported folder and builds the same prompt
    exported = transformers.AutoProcessor.from_pretrained(out)
    assert hf_inputs(exported, [random_image(50, 40, 4)])["input_ids"].tolist() == inputs["input_ids"].tolist()
    # and our loader reads it back
    ours_again = multimodal_models.load(out)
    ids, pixels = our_ids_and_pixels(ours_again, [random_image(50, 40, 4)])
    with torch.no_grad():
        assert (ours_again(ids, pixels).logits - reference(**inputs).logits).abs().max().item() <= 1e-5


def test_a_generated_image_placeholder_is_text_as_in_transformers(tmp_path):
    """A model may write its own <image> token (here: its embedding row, tied to the head, made to
    outscore the first word). transformers embeds it as the token it is and goes on; so do we, with and
    without the KV cache, in chat and in batched answers: the same tokens and the same logits each step."""
    folder, _ = make_llava(tmp_path / "llava", "qwen2-siglip")
    images = [random_image(45, 37, 1)]
    inputs = hf_inputs(hf_processor(folder, "llava"), images)
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    image_id = reference.config.image_token_id
    with torch.no_grad():
        first = int(reference(**inputs).logits[0, -1].argmax())
    tensors = load_file(str(folder / "model.safetensors"))
    embeddings = next(key for key in tensors if key.endswith("embed_tokens.weight"))
    tensors[embeddings][image_id] = tensors[embeddings][first] * 1.05
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=[], pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert expected[0] == image_id and any(token != image_id for token in expected)

    model = multimodal_models.load(folder)
    encoding = model.chat_template().encode(conversation(images), add_generation_prompt=True)
    pixels = model.image_processor(encoding.images)
    for use_cache in (True, False):
        config = GenerationConfig(max_new_tokens=6, use_cache=use_cache)
        assert list(generate_tokens(VLMSession(model, torch.tensor([encoding.ids]), pixels, config), config,
                                    set())) == expected
        session = VLMSession(model, torch.tensor([encoding.ids]), pixels, config)
        logits = [session.prefill()] + [session.step(torch.tensor([token])) for token in expected[:-1]]
        for ours, theirs in zip(logits, out.logits, strict=True):
            assert (ours - theirs).abs().max().item() <= 1e-5
    text = model.tokenizer.decode(expected)
    assert model.ask(images[0], "what is in the image?", max_new_tokens=6) == text
    assert model.answer_batch(["what is in the image?"] * 2, images=images * 2, max_new_tokens=6) == [text] * 2


def test_llava_saved_in_our_format_comes_back_the_same(llava, tmp_path):
    case, folder, reference, model = llava
    model.save_pretrained(tmp_path / "ours")
    again = multimodal_models.load(tmp_path / "ours")
    image = random_image(33, 33, 5)
    assert again.ask(image, "describe the picture", max_new_tokens=6) == model.ask(image, "describe the picture",
                                                                                 max_new_tokens=6)
    ids, pixels = our_ids_and_pixels(model, [image])
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixels).logits, model(ids, pixels).logits, atol=0, rtol=0)


# -- Idefics3 / SmolVLM --------------------------------------------------------------------------


@pytest.mark.parametrize("splitting", [False, True])
@pytest.mark.parametrize("size", [(40, 40), (120, 50), (50, 121), (13, 7), (300, 299), (81, 80)])
def test_idefics3_pixels_equal_transformers(splitting, size):
    settings = dict(size={"longest_edge": 120}, max_image_size={"longest_edge": 40}, do_image_splitting=splitting,
                    resample=1)
    reference = transformers.Idefics3ImageProcessorPil(**settings)
    ours = Idefics3ImageProcessor.from_dict(reference.to_dict())
    image = random_image(*size, seed=sum(size))
    expected = reference(image, return_tensors="pt", return_row_col_info=True)
    pixels = ours(image)
    theirs = expected["pixel_values"][0]
    assert pixels.shape == theirs.shape
    assert (pixels - theirs).abs().max().item() <= 1e-6
    assert ours.grid(image) == (expected["rows"][0][0], expected["cols"][0][0])


def test_idefics3_position_lookup_is_transformers_bucketing():
    assert patch_position_ids(4).tolist() == list(range(16))
    ids = patch_position_ids(19).reshape(19, 19)
    assert ids[12, 0] == 11 * 19  # row 12 reads row 11 of the table, as transformers' float32 bucketing does


@pytest.mark.parametrize("splitting", [False, True])
def test_idefics3_matches_transformers(splitting, tmp_path):
    folder, reference = make_idefics3(tmp_path / "idefics3", splitting=splitting)
    model = multimodal_models.load(folder)
    assert model.config.tokens_per_image == 25 and model.config.pixel_shuffle == 1
    processor = hf_processor(folder, "idefics3")
    images = [random_image(70, 45, 7)]
    inputs = assert_same_forward(model, reference, images, processor)
    assert assert_same_greedy(model, reference, inputs, images)
    rows, cols = model.image_processor.grid(images[0])
    assert (rows * cols > 0) == splitting
    # saved in our own format, it comes back with its tokenizer, template and tile processor
    model.save_pretrained(tmp_path / "ours")
    again = multimodal_models.load(tmp_path / "ours")
    assert isinstance(again.image_processor, Idefics3ImageProcessor)
    assert again.ask(images[0], "what?", max_new_tokens=5) == model.ask(images[0], "what?", max_new_tokens=5)


def test_idefics3_pixel_shuffle_connector_and_smolvlm_layout(tmp_path):
    folder, reference = make_idefics3_shuffled(tmp_path / "shuffled")
    model = multimodal_models.load(folder)
    assert model.config.tokens_per_image == 4 and model.config.decoder.tie_embeddings
    processor = hf_processor(folder, "idefics3")
    images = [random_image(100, 60, 8)]
    inputs = assert_same_forward(model, reference, images, processor)
    assert_same_greedy(model, reference, inputs, images)

    folder, reference = make_idefics3(tmp_path / "smolvlm", splitting=True, model_type="smolvlm")
    model = multimodal_models.load(folder)
    processor = hf_processor(folder, "idefics3")
    inputs = assert_same_forward(model, reference, images, processor)
    assert_same_greedy(model, reference, inputs, images)


def test_weight_tying_follows_the_flags_transformers_reads_and_never_drops_a_stored_head(tmp_path):
    images = [random_image(100, 60, 8)]

    def load_both(folder: Path):
        reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder).eval()
        return multimodal_models.load(folder), reference

    # Idefics3: only the top-level flag ties; text_config's alone leaves the stored head in use
    folder, _ = make_idefics3_shuffled(tmp_path / "text-only", tie=False, text_tie=True)
    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" in tensors
    model, reference = load_both(folder)
    assert not model.config.decoder.tie_embeddings
    assert model.decoder.lm_head.weight is not model.decoder.token_embedding.weight
    assert_same_forward(model, reference, images, hf_processor(folder, "idefics3"))

    # tied by the flag, yet a head stored beside the embeddings that differs from them: transformers uses it
    folder, _ = make_idefics3_shuffled(tmp_path / "stored-head", tie=True, text_tie=False)
    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # transformers stores a tied head once
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.text_model.embed_tokens.weight"])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="the stored lm_head.weight differs from model.text_model.embed_tokens"):
        model, reference = load_both(folder)
    assert not model.config.decoder.tie_embeddings
    assert torch.equal(model.decoder.lm_head.weight, tensors["lm_head.weight"])
    assert_same_forward(model, reference, images, hf_processor(folder, "idefics3"))
    # the same head stored twice is just tied
    tensors["lm_head.weight"] = tensors["model.text_model.embed_tokens.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert multimodal_models.load(folder).config.decoder.tie_embeddings

    # no head stored, and only text_config says to tie: transformers would make a random head; we refuse
    folder, _ = make_idefics3_shuffled(tmp_path / "no-head", tie=False, text_tie=True)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataFormatError, match="field 'tie_word_embeddings': there is no lm_head.weight"):
        multimodal_models.load(folder)


def test_llava_ties_by_the_text_config_flag_as_its_config_does(tmp_path):
    """transformers' LlavaConfig takes text_config's tie_word_embeddings when the top-level one is false."""
    folder, _ = make_llava(tmp_path / "llava", "llama-clip")
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"], config["text_config"]["tie_word_embeddings"] = False, True
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "model.safetensors"))
    head = next(key for key in tensors if key.endswith("lm_head.weight"))
    embeddings = next(key for key in tensors if key.endswith("embed_tokens.weight"))
    tensors[head] = tensors[embeddings].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    assert reference.lm_head.weight.data_ptr() == reference.model.language_model.embed_tokens.weight.data_ptr()
    model = multimodal_models.load(folder)
    assert model.config.decoder.tie_embeddings
    assert_same_forward(model, reference, [random_image(45, 37, 1)], hf_processor(folder, "llava"))


# -- the chat template -----------------------------------------------------------------------------


def test_idefics3_image_text_layout():
    assert idefics3_image_text(0, 0, 2, image_token="<i>") == "<fake_token_around_image><global-img><i><i><fake_token_around_image>"
    text = idefics3_image_text(1, 2, 1, image_token="<i>")
    assert text == ("<fake_token_around_image><row_1_col_1><i><fake_token_around_image><row_1_col_2><i>\n"
                    "\n<fake_token_around_image><global-img><i><fake_token_around_image>")


def test_jinja_template_targets_without_generation_blocks(tmp_path):
    from multimodal_models.data.hf_tokenizer import HFTokenizer

    write_tokenizer(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], bos=None, eos="<|im_end|>",
                    pad="<|endoftext|>", template=CHATML_TEMPLATE)
    tokenizer = HFTokenizer.from_folder(tmp_path)
    template = JinjaChatTemplate(tokenizer, tokenizer.chat_template, image_text=lambda image: "<image>" * 3)
    messages = [{"role": "user", "content": "<image>\nwhat is in the image?"},
                {"role": "assistant", "content": "a red circle."}]
    encoding = template.encode(messages)
    assert encoding.ids.count(tokenizer.token_to_id("<image>")) == 3 and encoding.images == [None]
    said = tokenizer.decode([i for i, t in zip(encoding.ids, encoding.targets) if t], skip_special_tokens=False)
    assert said == "a red circle.<|im_end|>\n"
    assert template.stop_ids() == {tokenizer.token_to_id("<|im_end|>")}
    with pytest.raises(ValueError, match="placeholders"):
        template.encode([{"role": "user", "content": [{"type": "text", "text": "<image> typed"}]}])


def test_checkpoints_that_do_not_fit_are_refused_with_the_key(llava, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from multimodal_models.errors import DataFormatError

    case, folder, reference, model = llava
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    key = "multi_modal_projector.linear_2.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(DataFormatError, match="linear_2.weight"):
        multimodal_models.load(broken)
    del tensors[key]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(DataFormatError, match="missing multi_modal_projector.linear_2.weight"):
        multimodal_models.load(broken)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataFormatError, match="RoPE scaling 'llama3'"):
        multimodal_models.load(broken)
    with pytest.raises(ValueError, match="more image parts than images"):
        model.chat([{"role": "user", "content": "<image> and <image>?"}], images=[random_image(9, 9, 0)])


def test_bfloat16_loading_halves_the_weights_and_keeps_rope_exact(llava):
    case, folder, _, model = llava
    half = multimodal_models.load(folder, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored after loading
    for ours, theirs in zip(model.parameters(), half.parameters(), strict=True):
        torch.testing.assert_close(ours.to(torch.bfloat16), theirs, rtol=0, atol=0)  # one rounding, not two
    rotary = [m for m in half.modules() if type(m).__name__ == "RotaryEmbedding"]
    assert rotary and all(m.inv_freq.dtype == torch.float32 for m in rotary)
    exact = next(m for m in model.modules() if type(m).__name__ == "RotaryEmbedding").inv_freq
    torch.testing.assert_close(rotary[0].inv_freq, exact, rtol=0, atol=0)
    assert isinstance(half.ask(random_image(45, 37, 1), "what is in the image?", max_new_tokens=4), str)
    with pytest.raises(ValueError, match="expected one of float32, bfloat16, float16"):
        multimodal_models.load(folder, dtype="int8")
