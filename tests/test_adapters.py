"""LoRA adapters in peft's layout: peft loads the adapters we write onto transformers' model and gets our
outputs; we load the adapters peft writes and get peft's outputs (tiny random LLaVA and Idefics3
checkpoints made by transformers); our own model types round-trip; bad adapters are refused by file
and field."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import multimodal_models
from multimodal_models.errors import DataFormatError
from multimodal_models.models.lora import apply_lora, lora_layers
from multimodal_models.models.vlm import VisionLanguageModel
from multimodal_models.pretrained.peft_adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FAMILIES, adapter_from_model,
                                                        apply_adapter)
from multimodal_models.pretrained.weights import export_tensors

from .test_pretrained_vlm import hf_inputs, hf_processor, make_idefics3, make_llava, our_ids_and_pixels, random_image
from .test_vlm import tiny_vlm

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft (a test extra) proves that peft reads our adapters and we read its")
transformers.logging.set_verbosity_error()

CASES = ["llava:llama-clip", "llava:qwen2-siglip", "idefics3"]
# every linear layer of the decoders, the vision towers and LLaVA's projector
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2",
              "linear_1"]
OUR_TARGETS = ("q", "k", "v", "out", "gate", "up", "down", "fc1", "fc2")


def make_checkpoint(case: str, folder):
    if case.startswith("llava:"):
        return make_llava(folder, case.split(":")[1])
    return make_idefics3(folder, splitting=False)


@pytest.fixture(scope="module", params=CASES)
def checkpoint(request, tmp_path_factory):
    folder, _ = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param.replace(":", "-")))
    return request.param, folder


def hf_model(case: str, folder):
    kind = transformers.LlavaForConditionalGeneration if case.startswith("llava") else \
        transformers.Idefics3ForConditionalGeneration
    return kind.from_pretrained(folder).eval()


def same_inputs(case: str, folder, model):
    """transformers' inputs and ours for one image and a question (the same ids)."""
    images = [random_image(45, 37, 1)]
    inputs = hf_inputs(hf_processor(folder, "llava" if case.startswith("llava") else "idefics3"), images)
    ids, pixels = our_ids_and_pixels(model, images)
    assert ids.tolist() == inputs["input_ids"].tolist()
    return inputs, ids, pixels


# Ours and transformers' Llama + CLIP LLaVA differ by ~7e-6 in float32 on weights other than this fixture's own
# (the bases alone, no adapter: measured on three perturbations), which an adapter's larger activations about
# double; the other two families compute bit for bit what transformers does.
TOLERANCE = {"llava:llama-clip": 3e-5}


def assert_same_logits(case: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=TOLERANCE.get(case, 1e-5), rtol=0)


def randomise_lora_b(parameters, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def assert_same_merged_weights(ours, theirs, folder) -> None:
    """Our merged model's tensors equal peft's merge_and_unload() of transformers' model, key by key
    through the family's key table: the adapter changed the same layers by the same amounts."""
    hf_config = json.loads((folder / "config.json").read_text())
    family = FAMILIES[hf_config["model_type"]]
    rows = family.rows(ours.config, hf_config, folder / "config.json")
    ours_by_key, base_by_key = export_tensors(ours, rows), export_tensors(multimodal_models.load(folder), rows)
    merged = {family.normalise(k): v for k, v in theirs.merge_and_unload().state_dict().items()}
    for key, tensor in ours_by_key.items():
        torch.testing.assert_close(tensor, merged[key], atol=1e-6, rtol=0, msg=key)
    assert sum(not torch.equal(ours_by_key[k], base_by_key[k]) for k in ours_by_key) > 10  # adapted


def test_peft_loads_our_adapter_with_our_outputs(checkpoint, tmp_path):
    case, folder = checkpoint
    ours = multimodal_models.load(folder)
    apply_lora(ours, targets=OUR_TARGETS, rank=4, alpha=8)  # decoder, vision tower and projector
    randomise_lora_b([layer.lora_b for layer in lora_layers(ours)])
    adapter = adapter_from_model(ours, base=str(folder), base_folder=folder)
    adapter.save_pretrained(tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8, "CAUSAL_LM")
    assert config["base_model_name_or_path"] == str(folder)
    keys = set(load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS)))
    language = "model.language_model" if case.startswith("llava") else "model.text_model"
    assert f"base_model.model.{language}.layers.1.self_attn.q_proj.lora_A.weight" in keys  # peft's names
    assert len(keys) == 2 * len(lora_layers(ours))

    theirs = peft.PeftModel.from_pretrained(hf_model(case, folder), tmp_path / "adapter").eval()
    inputs, ids, pixels = same_inputs(case, folder, ours)
    with torch.no_grad():
        expected = ours(ids, pixels).logits
        base = hf_model(case, folder)(**inputs).logits
        got = theirs(**inputs).logits
    assert (expected - base).abs().max().item() > 0.5  # the adapter changes the outputs...
    assert_same_logits(case, got, expected)  # ...and peft applies it as we do

    # merged into the weights, as load(base, adapter=...) does, it is peft's merge_and_unload()
    again = multimodal_models.load(folder, adapter=tmp_path / "adapter")
    assert not lora_layers(again) and set(again.state_dict()) == set(multimodal_models.load(folder).state_dict())
    assert_same_merged_weights(again, theirs, folder)


def peft_adapter(case: str, folder, out, **options):
    """An adapter peft makes on transformers' model, with random (non-zero) lora_B, saved; and peft's model."""
    torch.manual_seed(1)
    model = peft.get_peft_model(hf_model(case, folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS,
                                                                           **options))
    randomise_lora_b([p for name, p in model.named_parameters() if "lora_B" in name], seed=2)
    model.save_pretrained(out)
    return model.eval()


def test_we_load_peft_adapters_with_peft_outputs(checkpoint, tmp_path):
    case, folder = checkpoint
    theirs = peft_adapter(case, folder, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(folder)
    ours = multimodal_models.load(folder, adapter=tmp_path / "peft")  # merged into the weights
    kept = apply_adapter(multimodal_models.load(folder), tmp_path / "peft", base_folder=folder, merge=False)
    inputs, ids, pixels = same_inputs(case, folder, ours)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        base = multimodal_models.load(folder)(ids, pixels).logits
        by_folder = multimodal_models.load(tmp_path / "peft")(ids, pixels).logits  # the base it names
        assert (expected - base).abs().max().item() > 0.5
        assert_same_logits(case, kept(ids, pixels).logits, expected)  # the adapter kept apart, as peft keeps it
        merged = ours(ids, pixels).logits
        assert torch.equal(by_folder, merged)
        assert_same_logits(case, merged, theirs.merge_and_unload()(**inputs).logits)


def test_rslora_and_rank_and_alpha_patterns_are_read_as_peft_does(tmp_path):
    case = "llava:qwen2-siglip"
    folder, _ = make_checkpoint(case, tmp_path / "llava")
    theirs = peft_adapter(case, folder, tmp_path / "peft", use_rslora=True, rank_pattern={"q_proj": 2},
                          alpha_pattern={"down_proj": 3})
    ours = apply_adapter(multimodal_models.load(folder), tmp_path / "peft", base_folder=folder, merge=False)
    assert {layer.rank for layer in lora_layers(ours)} == {2, 4}
    inputs, ids, pixels = same_inputs(case, folder, ours)
    with torch.no_grad():
        assert_same_logits(case, ours(ids, pixels).logits, theirs(**inputs).logits)


def test_adapter_applied_after_the_dtype_cast_and_on_the_device(tmp_path):
    case = "llava:qwen2-siglip"
    folder, _ = make_checkpoint(case, tmp_path / "llava")
    peft_adapter(case, folder, tmp_path / "peft")
    full = multimodal_models.load(folder, adapter=tmp_path / "peft")
    half = multimodal_models.load(folder, adapter=tmp_path / "peft", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    plain = multimodal_models.load(folder, dtype="bfloat16")
    changed = 0
    for name, exact in full.state_dict().items():  # the float32 update added to the bfloat16 weight: 2 roundings
        if exact.dtype == torch.float32 and "inv_freq" not in name:
            error = (half.state_dict()[name].float() - exact).abs().max().item()
            assert error <= 2 ** -7 * exact.abs().max().item(), name
            changed += not torch.equal(half.state_dict()[name], plain.state_dict()[name])
    assert changed > 10
    # an adapter applied to a model already cast and moved is what load does after the cast
    apply_adapter(plain, tmp_path / "peft", base_folder=folder)
    for name, tensor in half.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name


def test_our_own_model_type_round_trips_through_an_adapter_folder(tmp_path):
    base = tiny_vlm(sharpen=False)
    base.save_pretrained(tmp_path / "base")
    model = multimodal_models.load(tmp_path / "base")
    apply_lora(model.decoder, targets=("q", "v", "fc1"), rank=2, alpha=4)
    randomise_lora_b([layer.lora_b for layer in lora_layers(model)])
    adapter_from_model(model, base=str(tmp_path / "base"), base_folder=tmp_path / "base").save_pretrained(
        tmp_path / "adapter", dtype=torch.float16)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["target_modules"][0] == "decoder.blocks.0.attn.q"  # our module names
    assert config["auto_mapping"] is None
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert "base_model.model.decoder.blocks.1.mlp.fc1.lora_B.weight" in tensors

    image = random_image(40, 40, 0)
    encoding = model.chat_template().encode([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "is there a red circle?"}]}], add_generation_prompt=True)
    ids, pixels = torch.tensor([encoding.ids]), model.image_processor(encoding.images)
    with torch.no_grad():  # the float16 copies of A and B applied in float32
        for layer in lora_layers(model):
            layer.lora_a.copy_(layer.lora_a.half())
            layer.lora_b.copy_(layer.lora_b.half())
        expected = model(ids, pixels).logits
        plain = base(ids, pixels).logits
        by_base = multimodal_models.load(tmp_path / "base", adapter=tmp_path / "adapter")(ids, pixels).logits
        by_folder = multimodal_models.load(tmp_path / "adapter")(ids, pixels).logits  # base_model_name_or_path
    assert (expected - plain).abs().max().item() > 1e-2
    assert (by_base - expected).abs().max().item() <= 1e-5
    assert torch.equal(by_folder, by_base)

    kept = apply_adapter(multimodal_models.load(tmp_path / "base"), tmp_path / "adapter",
                         base_folder=tmp_path / "base", merge=False)  # the adapter kept separate
    assert len(lora_layers(kept)) == 2 * 3
    with torch.no_grad():
        assert (kept(ids, pixels).logits - expected).abs().max().item() <= 1e-5


# -- what is refused ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_adapter(tmp_path_factory):
    """A saved tiny model of ours and a LoRA adapter of it."""
    root = tmp_path_factory.mktemp("own")
    tiny_vlm(sharpen=False).save_pretrained(root / "base")
    model = multimodal_models.load(root / "base")
    apply_lora(model.decoder, targets=("q", "v"), rank=2, alpha=4)
    adapter_from_model(model, base=str(root / "base"), base_folder=root / "base").save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def edited(adapter, tmp_path, *, config: dict | None = None, tensors=None):
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    if config is not None:
        data = json.loads((folder / ADAPTER_CONFIG).read_text())
        data.update(config)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(data))
    if tensors is not None:
        save_file(tensors(load_file(str(folder / ADAPTER_WEIGHTS))), str(folder / ADAPTER_WEIGHTS))
    return folder


@pytest.mark.parametrize("change, field, message", [
    ({"peft_type": "IA3"}, "peft_type", "peft_type 'IA3' is not supported"),
    ({"use_dora": True}, "use_dora", "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", "modules_to_save"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights", "replaces the base model's weights"),
    ({"bias": "all"}, "bias", "bias 'all' is not supported"),
    ({"use_future_trick": True}, "use_future_trick", "not supported"),
    ({"r": 0}, "r", "expected a positive number"),
    ({"target_modules": ["c_attn", "c_proj"]}, "target_modules", r"\['c_attn', 'c_proj'\] name no linear layer"),
])
def test_unsupported_or_mismatched_configs_are_refused_by_file_and_field(own_adapter, tmp_path, change, field,
                                                                         message):
    base, adapter = own_adapter
    folder = edited(adapter, tmp_path, config=change)
    with pytest.raises(DataFormatError, match=message) as error:
        multimodal_models.load(base, adapter=folder)
    assert str(folder / ADAPTER_CONFIG) in str(error.value) and f"field '{field}'" in str(error.value)


def test_an_adapter_of_another_base_is_refused_naming_the_tensor(own_adapter, tmp_path):
    base, adapter = own_adapter
    small = multimodal_models.load(base)
    wider = VisionLanguageModel(dataclasses.replace(small.config, decoder=dataclasses.replace(small.config.decoder,
                                                                                              width=48)))
    wider.tokenizer, wider.image_processor = small.tokenizer, small.image_processor
    wider.save_pretrained(tmp_path / "wide")
    with pytest.raises(DataFormatError, match=r"do not fit a rank-2 update of the base's \(48, 48\) layer; the "
                                              r"adapter was made for .*base") as error:
        multimodal_models.load(tmp_path / "wide", adapter=adapter)
    assert str(adapter / ADAPTER_WEIGHTS) in str(error.value)
    assert "field 'base_model.model.decoder.blocks.0.attn.q.lora_A.weight'" in str(error.value)

    def deeper(tensors):  # a layer the base does not have
        return {k.replace("blocks.1.", "blocks.7."): t for k, t in tensors.items()}

    with pytest.raises(DataFormatError, match="adapts decoder.blocks.7.attn.q, which the base .* has no linear layer"):
        multimodal_models.load(base, adapter=edited(adapter, tmp_path, tensors=deeper))


def test_adapter_tensors_other_than_lora_a_and_b_are_refused(own_adapter, tmp_path):
    base, adapter = own_adapter

    def with_embedding_lora(tensors):
        return {**tensors, "base_model.model.decoder.token_embedding.lora_embedding_A": torch.zeros(2, 5)}

    with pytest.raises(DataFormatError, match="lora_embedding_A' is not the lora_A / lora_B weight"):
        multimodal_models.load(base, adapter=edited(adapter, tmp_path, tensors=with_embedding_lora))


def test_an_adapter_folder_without_a_base_or_without_its_files(own_adapter, tmp_path):
    base, adapter = own_adapter
    folder = edited(adapter, tmp_path, config={"base_model_name_or_path": None})
    with pytest.raises(DataFormatError, match="field 'base_model_name_or_path': names no base model"):
        multimodal_models.load(folder)
    (folder / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        multimodal_models.load(base, adapter=folder)
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        multimodal_models.load(base, adapter=base)
    with pytest.raises(FileNotFoundError, match="hf download someone/lora --local-dir DIR"):
        multimodal_models.load(base, adapter="someone/lora")


# -- the command line -----------------------------------------------------------------------------


def test_commands_that_load_a_vlm_take_an_adapter(tmp_path, capsys):
    from multimodal_models.cli import build_parser, main

    tiny_vlm().save_pretrained(tmp_path / "base")  # sharpened: it says something
    model = multimodal_models.load(tmp_path / "base")
    apply_lora(model.decoder, targets=("q", "v", "fc1"), rank=2, alpha=4)
    randomise_lora_b([layer.lora_b for layer in lora_layers(model)], seed=3)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_b.mul_(40)  # an adapter that changes what the model says
    adapter_from_model(model, base=str(tmp_path / "base"), base_folder=tmp_path / "base").save_pretrained(
        tmp_path / "adapter")
    image = tmp_path / "red.png"
    random_image(40, 40, 7).save(image)
    question = "is there a red circle?"
    adapted = multimodal_models.load(tmp_path / "base", adapter=tmp_path / "adapter").ask(str(image), question,
                                                                                       max_new_tokens=6)
    plain = multimodal_models.load(tmp_path / "base").ask(str(image), question, max_new_tokens=6)
    assert adapted != plain

    common = ["--model", str(tmp_path / "base"), "--max-tokens", "6", "--device", "cpu"]
    assert main(["ask", str(image), question, *common, "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out.strip() == adapted
    assert main(["ask", str(image), question, *common]) == 0
    assert capsys.readouterr().out.strip() == plain
    assert main(["ask", str(image), question, *common, "--adapter", str(tmp_path / "base")]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err
    for command in (["caption", "x.png"], ["chat", "x.png"], ["evaluate", "--out", "report"]):
        assert build_parser().parse_args([*command, "--adapter", "A"]).adapter == "A"
