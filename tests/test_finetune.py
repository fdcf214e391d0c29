"""Fine-tuning loaded checkpoints with `multimodal train`: a Hugging Face CLIP on a COCO-format
folder, and a Hugging Face LLaVA with LoRA on its decoder on LLaVA-format conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from multimodal_models.data import formats
from multimodal_models.data.records import CaptionRecord, ConversationRecord, Turn
from multimodal_models.loading import load
from multimodal_models.training.config import config_from_raw
from multimodal_models.training.loop import train

from .test_pretrained_clip import clip_checkpoint  # noqa: F401  (fixture)
from .test_pretrained_vlm import hf_inputs, hf_processor, make_llava, our_ids_and_pixels

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def coloured_images(folder, count: int):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(count):
        colour = list(COLOURS)[k % 3]
        path = folder / f"img{k}.png"
        Image.new("RGB", (40, 40), COLOURS[colour]).save(path)
        out.append((path, colour))
    return out


def test_fine_tune_a_hugging_face_clip_on_a_coco_folder(clip_checkpoint, tmp_path):  # noqa: F811
    folder = clip_checkpoint[0]
    images = coloured_images(tmp_path / "images", 12)
    records = [CaptionRecord(k + 1, path, (f"a {colour} square", f"the colour {colour}")) for k, (path, colour) in enumerate(images)]
    formats.write_coco_captions(tmp_path / "captions.json", records, image_size=40)
    config = {
        "task": "contrastive",
        "data": {"train": {"captions": str(tmp_path / "captions.json"), "images": str(tmp_path / "images")},
                 "eval": {"captions": str(tmp_path / "captions.json"), "images": str(tmp_path / "images")}},
        "model": {},
        "task_options": {"init_from": str(folder)},
        "train": {"steps": 4, "batch_size": 6, "lr": 1e-3, "warmup": 1, "eval_every": 4, "eval_samples": 12,
                  "precision": "fp32"},
        "output": str(tmp_path / "run"),
    }
    summary = train(config_from_raw(config), progress=False)
    assert "retrieval" in summary["final_eval"]
    before, after = load(folder), load(tmp_path / "run" / "model")
    assert type(after.tokenizer).__name__ == "HFTokenizer"  # the checkpoint's own tokenizer came along
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert changed  # the weights moved
    text = after.embed_texts(["a red square"])
    assert text.shape == (1, before.config.embed_dim)


def llava_lora_run(tmp_path, **lora) -> tuple[dict, object, list]:
    """A LoRA run (rank 4) on a tiny random LLaVA made by transformers: its config, the LLaVA folder and the images."""
    folder, _ = make_llava(tmp_path / "llava", "llama-clip")
    images = coloured_images(tmp_path / "images", 8)
    conversations = [
        ConversationRecord(str(k), (path,), (Turn("user", "<image>\nWhat colour is it?"), Turn("assistant", colour)))
        for k, (path, colour) in enumerate(images)
    ]
    formats.write_llava(tmp_path / "chats.json", conversations, image_dir=tmp_path)
    config = {
        "task": "vlm",
        "data": {"train": {"dialogues": str(tmp_path / "chats.json"), "images": str(tmp_path / "images")},
                 "eval": {"dialogues": str(tmp_path / "chats.json"), "images": str(tmp_path / "images")}},
        "model": {},
        "task_options": {"init_from": str(folder), "lora": {"rank": 4, "alpha": 8, **lora}},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 1, "eval_every": 3, "eval_samples": 4,
                  "precision": "fp32"},
        "output": str(tmp_path / "run"),
    }
    return config, folder, images


def test_lora_fine_tune_a_hugging_face_llava_on_conversations(tmp_path):
    config, folder, images = llava_lora_run(tmp_path)
    train(config_from_raw(config), progress=False)
    before, after = load(folder), load(tmp_path / "run" / "model")
    state_before, state_after = before.state_dict(), after.state_dict()
    assert state_before.keys() == state_after.keys()  # LoRA merged away: a plain model again
    moved = {k for k in state_before if not torch.equal(state_before[k], state_after[k])}
    assert moved and all(k.startswith("decoder.") for k in moved)  # only the decoder was adapted
    assert not any(k.startswith("vision.") for k in moved)
    reply = after.ask(images[0][0], "What colour is it?", max_new_tokens=3)
    assert isinstance(reply, str)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("eval" in r and r["eval"].get("dialogue") is not None for r in log)

    # beside the merged model, the adapter alone in peft's layout, naming the model the run started from
    adapter = tmp_path / "run" / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(folder.resolve())
    assert (adapter_config["peft_type"], adapter_config["r"], adapter_config["lora_alpha"]) == ("LORA", 4, 8)
    assert "model.language_model.layers.1.self_attn.o_proj" in adapter_config["target_modules"]  # ("out")
    applied = load(folder, adapter=adapter)  # the same merge: the same numbers as the merged model
    assert all(torch.equal(tensor, state_after[key]) for key, tensor in applied.state_dict().items())
    assert all(torch.equal(tensor, state_after[key]) for key, tensor in load(adapter).state_dict().items())

    # peft applies it to transformers' model of the folder as our merged model computes
    peft = pytest.importorskip("peft", reason="peft (a test extra) proves that it reads the adapters we write")
    transformers = pytest.importorskip("transformers")
    theirs = peft.PeftModel.from_pretrained(transformers.LlavaForConditionalGeneration.from_pretrained(folder),
                                            adapter).eval()
    image = Image.open(images[0][0]).convert("RGB")
    inputs = hf_inputs(hf_processor(folder, "llava"), [image])
    ids, pixels = our_ids_and_pixels(after, [image])
    assert ids.tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(after(ids, pixels).logits, theirs(**inputs).logits, atol=1e-5, rtol=0)


def test_lora_run_that_keeps_the_adapter_alone(tmp_path):
    config, folder, _ = llava_lora_run(tmp_path, merge=False)
    config["train"].update(steps=1, eval_every=1, eval_samples=2)
    summary = train(config_from_raw(config), progress=False)
    model = Path(summary["model"])
    assert sorted(p.name for p in model.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapted, base = load(model), load(folder)  # the adapter on the base it names
    moved = {k for k, t in base.state_dict().items() if not torch.equal(t, adapted.state_dict()[k])}
    assert moved and all(k.startswith("decoder.") for k in moved)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        model / "adapter_model.safetensors").read_bytes()

    config["output"] = str(tmp_path / "run2")
    config["task_options"].pop("init_from")
    config["model"] = {"vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                       "decoder": {"width": 32, "depth": 1, "heads": 2}}
    with pytest.raises(ValueError, match="lora.merge: false saves the adapter alone.*set task_options.init_from"):
        train(config_from_raw(config), progress=False)
