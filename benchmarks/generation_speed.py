"""Generation speed of a native multimodal LM with and without the KV cache (tokens/s).

    .venv/bin/python benchmarks/generation_speed.py [--model shapes-vlm] [--tokens 48] [--repeats 5]

Both runs generate the same greedy continuation of the same prompts in the same process
(interleaved, one thread); the reference is the run without the cache.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from multimodal_models.shapes.world import render_scene, sample_scene
from multimodal_models.loading import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-vlm")
    parser.add_argument("--tokens", type=int, default=48, help="tokens to generate per prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    import random

    images = [render_scene(sample_scene(random.Random(k)), model.config.vision.image_size) for k in range(args.repeats)]
    # generate exactly --tokens tokens: no stop token can end it early
    options = dict(max_new_tokens=args.tokens)
    timings = {"kv_cache": [], "no_cache": []}
    counts = {"kv_cache": 0, "no_cache": 0}
    outputs = {}
    for image in images:
        for name, use_cache in (("kv_cache", True), ("no_cache", False)):
            session_tokens = []
            from multimodal_models.models.generation import GenerationConfig, generate_tokens
            from multimodal_models.models.vlm import VLMSession

            template = model.chat_template()
            encoding = template.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                        "text": "describe the image."}]}], add_generation_prompt=True)
            config = GenerationConfig(use_cache=use_cache, **options)
            start = time.perf_counter()
            with torch.no_grad():
                session = VLMSession(model, torch.tensor([encoding.ids]), model.image_processor([image]), config)
                session_tokens = list(generate_tokens(session, config, stop_ids=set()))
            timings[name].append(time.perf_counter() - start)
            counts[name] += len(session_tokens)
            outputs.setdefault(name, []).append(session_tokens)
    same = outputs["kv_cache"] == outputs["no_cache"]
    result = {name: round(counts[name] / sum(timings[name]), 1) for name in timings}
    print(json.dumps({"model": args.model, "tokens_per_prompt": args.tokens, "prompts": args.repeats,
                      "threads": args.threads, "tokens_per_s": result,
                      "speedup_from_kv_cache": round(result["kv_cache"] / result["no_cache"], 2),
                      "identical_outputs": same}, indent=2))


if __name__ == "__main__":
    main()
