"""`export(model, out, format="hf")` / `multimodal export MODEL OUT --format hf` for VLMs: tiny random
Idefics3 and SmolVLM checkpoints made by transformers, loaded by us and written back, load in
transformers' Idefics3ForConditionalGeneration and AutoProcessor with the same logits (1e-5), the same
greedy tokens and the same prompt ids and pixels; the CLI writes LLaVA and Idefics3 folders, and
refuses a model with no Hugging Face layout by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import multimodal_models
from multimodal_models.cli import main
from multimodal_models.errors import WrongModelError
from multimodal_models.export import export
from multimodal_models.pretrained.idefics3 import patch_position_ids, position_table_to_hf

from .test_pretrained_vlm import (
    IDEFICS3_SPECIALS,
    SMOLVLM_TEMPLATE,
    assert_same_forward,
    assert_same_greedy,
    hf_inputs,
    hf_processor,
    make_idefics3,
    make_idefics3_shuffled,
    make_llava,
    our_ids_and_pixels,
    random_image,
    write_tokenizer,
)

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# what transformers 5's save_pretrained writes for an Idefics3 model and its Idefics3Processor
TRANSFORMERS_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                      "tokenizer_config.json", "chat_template.jinja", "processor_config.json"}


def make_idefics3_grid19(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A 19 x 19 patch grid: transformers' float32 bucketing makes two patches share a row of the
    position table (and leaves a row unread), so the export must un-gather the table."""
    vocab = write_tokenizer(folder, ["<|endoftext|>", "<|im_start|>"] + IDEFICS3_SPECIALS, bos="<|im_start|>",
                            eos="<end_of_utterance>", pad="<|endoftext|>", template=SMOLVLM_TEMPLATE)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=38,
                  patch_size=2, initializer_range=0.2)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=vocab, max_position_embeddings=512, initializer_range=0.2)
    config = transformers.Idefics3Config(vision_config=vision, text_config=text, image_token_id=3, scale_factor=1)
    torch.manual_seed(2)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    transformers.Idefics3ImageProcessorPil(size={"longest_edge": 38}, max_image_size={"longest_edge": 38},
                                           do_image_splitting=False, resample=1).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                              "image_seq_len": 361}))
    return folder, model


CASES = {
    # image splitting on, untied head, 5 x 5 grid, scale_factor 1
    "idefics3-split": lambda folder: make_idefics3(folder, splitting=True),
    # SmolVLMForConditionalGeneration's folder: written as Idefics3, the same model
    "smolvlm": lambda folder: make_idefics3(folder, splitting=True, model_type="smolvlm"),
    # pixel-shuffle connector (scale_factor 2), tied head, no splitting in the prompt of a small image
    "idefics3-shuffled-tied": lambda folder: make_idefics3_shuffled(folder),
    "idefics3-grid19": make_idefics3_grid19,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_idefics3_export_loads_in_transformers_with_the_same_outputs(case, tmp_path):
    folder, reference = CASES[case](tmp_path / "source")
    model = multimodal_models.load(folder)
    out = export(model, tmp_path / "export", format="hf")
    assert {p.name for p in out.iterdir()} == TRANSFORMERS_FILES
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "idefics3" and config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert config["tie_word_embeddings"] is model.config.decoder.tie_embeddings  # the top-level flag transformers reads
    assert config["scale_factor"] == model.config.pixel_shuffle

    again = transformers.Idefics3ForConditionalGeneration.from_pretrained(out).eval()
    assert again.config.tie_word_embeddings is model.config.decoder.tie_embeddings
    images = [random_image(100, 60, 8)]
    source_inputs = hf_inputs(hf_processor(folder, "idefics3"), images)
    with torch.no_grad():
        expected = reference(**source_inputs).logits
        assert (again(**source_inputs).logits - expected).abs().max().item() <= 1e-5

    # transformers' AutoProcessor reads the export: Idefics3Processor, the same splitting, ids and pixels
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Idefics3Processor"
    assert processor.image_seq_len == model.config.tokens_per_image
    source_image = hf_processor(folder, "idefics3").image_processor
    for name in ("do_image_splitting", "size", "max_image_size", "resample", "image_mean", "image_std"):
        assert getattr(processor.image_processor, name) == getattr(source_image, name), name
    inputs = hf_inputs(processor, images)
    assert inputs["input_ids"].tolist() == source_inputs["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], source_inputs["pixel_values"], atol=0, rtol=0)

    # the exported model in transformers against ours: logits within 1e-5, greedy tokens identical
    assert_same_greedy(model, again, assert_same_forward(model, again, images, processor), images)

    # and our loader reads the export back to the same numbers
    ours_again = multimodal_models.load(out)
    assert ours_again.config == model.config
    ids, pixels = our_ids_and_pixels(ours_again, images)
    with torch.no_grad():
        assert (ours_again(ids, pixels).logits - expected).abs().max().item() <= 1e-5


def test_the_position_table_is_ungathered_and_a_trained_split_is_refused():
    grid = 19
    order = patch_position_ids(grid)
    assert len(set(order.tolist())) < grid * grid  # the case: shared and unread rows
    hf_table = torch.randn(grid * grid, 8)
    ours = hf_table[order]  # what load_idefics3 stores
    exported = position_table_to_hf(ours, grid)
    assert torch.equal(exported[order], ours)
    unread = sorted(set(range(grid * grid)) - set(order.tolist()))
    assert torch.equal(exported[unread], ours[unread])
    shared = [i for i in range(grid * grid) if int((order == order[i]).sum()) > 1]
    ours[shared[0]] += 1.0  # training moved one of two patches that share transformers' row
    with pytest.raises(ValueError, match="cannot be written in the Idefics3 layout"):
        position_table_to_hf(ours, grid)


def test_what_idefics3_cannot_hold_is_refused(tmp_path):
    import dataclasses

    folder, _ = make_idefics3_shuffled(tmp_path / "source")
    model = multimodal_models.load(folder)
    model.config = dataclasses.replace(model.config, image_attention="bidirectional")
    with pytest.raises(ValueError, match="cannot be written as Idefics3ForConditionalGeneration.*image_attention"):
        export(model, tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()


# -- the command -------------------------------------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exports_llava_and_idefics3_as_transformers_loads_them(tmp_path, capsys):
    folder, reference = make_llava(tmp_path / "llava", "qwen2-siglip")
    code, out, err = run_cli(["export", str(folder), str(tmp_path / "llava-hf"), "--format", "hf"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "hf" and "model.safetensors" in report["files"]
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava-hf").eval()
    inputs = hf_inputs(transformers.AutoProcessor.from_pretrained(tmp_path / "llava-hf"), [random_image(50, 40, 4)])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)

    folder, reference = make_idefics3(tmp_path / "idefics3", splitting=True)
    code, out, err = run_cli(["export", str(folder), str(tmp_path / "idefics3-hf"), "--format", "hf"], capsys)
    assert code == 0, err
    assert set(json.loads(out)["files"]) == TRANSFORMERS_FILES
    again = transformers.Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "idefics3-hf").eval()
    inputs = hf_inputs(transformers.AutoProcessor.from_pretrained(tmp_path / "idefics3-hf"), [random_image(70, 45, 7)])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)


def test_cli_refuses_a_model_without_a_hugging_face_layout(tmp_path, capsys):
    from .test_classifier import tiny_model

    code, out, err = run_cli(["export", "shapes-vlm", str(tmp_path / "shapes"), "--format", "hf"], capsys)
    assert code == 2 and out == ""
    assert "a shapes_vlm model has no Hugging Face layout" in err
    assert not (tmp_path / "shapes").exists()

    classifier = tiny_model().save_pretrained(tmp_path / "classifier")
    code, out, err = run_cli(["export", str(classifier), str(tmp_path / "classifier-hf"), "--format", "hf"], capsys)
    assert code == 2 and "model has no Hugging Face layout: --format hf writes dual encoders" in err
    assert not (tmp_path / "classifier-hf").exists()
    with pytest.raises(WrongModelError):
        export(multimodal_models.load(classifier), tmp_path / "again", format="hf")
