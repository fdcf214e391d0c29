"""Size and speed of distilled students against their teachers, measured side by side.

    .venv/bin/python benchmarks/distillation.py [--clip shapes-clip shapes-clip-small]
        [--vlm shapes-vlm shapes-vlm-small] [--threads 1] [--rounds 5]

For each (teacher, student) pair: parameters (all the model holds, a frozen tower included),
the size of model.safetensors, and the speed on this CPU, teacher and student interleaved
round by round in the same process (the median round of each is reported, and the student's
speed as a ratio of the teacher's):

- dual encoders: images/s embedding 256 rendered Shapes scenes (batches of 64), texts/s
  embedding 1,024 captions (batches of 256);
- multimodal LMs: tokens/s of greedy generation with the KV cache, exactly --tokens tokens
  after the caption prompt, one image at a time (as benchmarks/generation_speed.py), and
  answers/s of batched VQA (answer_batch, 64 questions about 64 images per call).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from multimodal_models.loading import load, resolve
from multimodal_models.models.generation import GenerationConfig, generate_tokens
from multimodal_models.models.vlm import VLMSession
from multimodal_models.shapes.language import make_captions
from multimodal_models.shapes.world import render_scene, sample_scene


def size(name: str, model) -> dict:
    weights = resolve(name) / "model.safetensors"
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "file_mb": round(weights.stat().st_size / 2**20, 2)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dual_encoder_round(model, images, captions) -> dict:
    image_s = timed(lambda: model.embed_images(images, batch_size=64))
    text_s = timed(lambda: model.embed_texts(captions, batch_size=256))
    return {"images_per_s": len(images) / image_s, "texts_per_s": len(captions) / text_s}


def vlm_round(model, images, questions, tokens: int) -> dict:
    template = model.chat_template()
    encoding = template.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                "text": "describe the image."}]}], add_generation_prompt=True)
    config = GenerationConfig(max_new_tokens=tokens)
    generated, seconds = 0, 0.0
    for image in images[:4]:
        start = time.perf_counter()
        with torch.no_grad():
            session = VLMSession(model, torch.tensor([encoding.ids]), model.image_processor([image]), config)
            generated += len(list(generate_tokens(session, config, stop_ids=set())))  # no stop: exactly `tokens`
        seconds += time.perf_counter() - start
    answer_s = timed(lambda: model.answer_batch(questions, images=images))
    return {"tokens_per_s": generated / seconds, "answers_per_s": len(questions) / answer_s}


def compare(kind: str, teacher_name: str, student_name: str, rounds: int, tokens: int) -> dict:
    teacher, student = load(teacher_name), load(student_name)
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(256)]
    size_px = teacher.config.vision.image_size
    images = [render_scene(scene, size_px) for scene in scenes]
    if kind == "clip":
        captions = [c for scene in scenes for c in make_captions(scene, rng, count=4)]
        measure = lambda model: dual_encoder_round(model, images, captions)  # noqa: E731
    else:
        questions = ["what color is the " + ("circle" if k % 2 else "square") + "?" for k in range(64)]
        measure = lambda model: vlm_round(model, images[:64], questions, tokens)  # noqa: E731
    runs: dict[str, list[dict]] = {"teacher": [], "student": []}
    measure(student), measure(teacher)  # warm-up
    for _ in range(rounds):
        for role, model in (("teacher", teacher), ("student", student)):
            runs[role].append(measure(model))
    out = {}
    for role, name, model in (("teacher", teacher_name, teacher), ("student", student_name, student)):
        medians = {key: round(statistics.median(r[key] for r in runs[role]), 1) for key in runs[role][0]}
        out[role] = {"model": name, **size(name, model), **medians}
    out["student_over_teacher"] = {key: round(out["student"][key] / out["teacher"][key], 2)
                                   for key in out["student"] if key != "model"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", nargs=2, metavar=("TEACHER", "STUDENT"), default=["shapes-clip", "shapes-clip-small"])
    parser.add_argument("--vlm", nargs=2, metavar=("TEACHER", "STUDENT"), default=["shapes-vlm", "shapes-vlm-small"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per caption prompt")
    parser.add_argument("--skip", choices=("clip", "vlm"), help="measure only the other pair")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "rounds": args.rounds}
    for kind in ("clip", "vlm"):
        if args.skip != kind:
            teacher, student = getattr(args, kind)
            results[kind] = compare(kind, teacher, student, args.rounds, args.tokens)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
