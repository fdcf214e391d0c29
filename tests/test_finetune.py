"""Fine-tuning loaded checkpoints with `multimodal train`: a Hugging Face CLIP on a COCO-format
folder, and a Hugging Face LLaVA with LoRA on its decoder on LLaVA-format conversations."""

from __future__ import annotations

import json

import torch
from PIL import Image

from multimodal_models.data import formats
from multimodal_models.data.records import CaptionRecord, ConversationRecord, Turn
from multimodal_models.loading import load
from multimodal_models.training.config import config_from_raw
from multimodal_models.training.loop import train

from .test_pretrained_clip import clip_checkpoint  # noqa: F401  (fixture)
from .test_pretrained_vlm import make_llava

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


def test_lora_fine_tune_a_hugging_face_llava_on_conversations(tmp_path):
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
        "task_options": {"init_from": str(folder), "lora": {"rank": 4, "alpha": 8}},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 1, "eval_every": 3, "eval_samples": 4,
                  "precision": "fp32"},
        "output": str(tmp_path / "run"),
    }
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
