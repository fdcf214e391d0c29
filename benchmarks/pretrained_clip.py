"""A ViT-B/32-shaped CLIP checkpoint in our modules against transformers: embedding time and agreement.

    .venv/bin/python benchmarks/pretrained_clip.py [--images 8] [--texts 32] [--repeats 5] [--threads 1]

A CLIPModel of the real ViT-B/32 size (vision 768 wide x 12 layers, 224px, 32px patches; text
512 x 12, 77 positions; 512-d embeddings) with random weights is saved in the Hugging Face
layout, loaded by `multimodal_models.load` and by transformers, and both embed the same
preprocessed images and the same token ids. The runs are interleaved in one process on the
same threads; times are medians per batch, and the ratio is ours / transformers (< 1: we are
faster). The differences are the largest absolute ones over the L2-normalised embeddings and
over the logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_checkpoint(folder: Path) -> None:
    """ViT-B/32 CLIPModel with random weights, a tiny stand-in tokenizer and CLIP's image processor."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in list("abcdefghijklmnopqrstuvwxyz.") + [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz."]:
        vocab[piece] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = transformers.CLIPConfig(text_config={"eos_token_id": 1, "bos_token_id": 0, "pad_token_id": 1})
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per batch")
    parser.add_argument("--texts", type=int, default=32, help="texts per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    import multimodal_models
    from multimodal_models.models.inputs import tokenize

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_checkpoint(folder)
        start = time.perf_counter()
        ours = multimodal_models.load(folder)
        load_ours = time.perf_counter() - start
        start = time.perf_counter()
        theirs = transformers.CLIPModel.from_pretrained(folder).eval()
        load_theirs = time.perf_counter() - start

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (rng.integers(200, 400), rng.integers(200, 400), 3), dtype=np.uint8))
              for _ in range(args.images)]
    pixels = ours.image_processor(images)
    words = "a photo of the cat dog on grass in a red car".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(args.texts)]
    ids, mask = tokenize(ours.tokenizer, texts, ours.config.text.max_length)

    timings: dict[str, list[float]] = {"ours_image": [], "transformers_image": [], "ours_text": [],
                                       "transformers_text": []}
    runs = {
        "ours_image": lambda: ours.encode_image(pixels),
        "transformers_image": lambda: theirs.get_image_features(pixel_values=pixels).pooler_output,
        "ours_text": lambda: ours.encode_text(ids, mask),
        "transformers_text": lambda: theirs.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
    }
    results = {}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up
            results[name] = run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
        reference = theirs(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        logits = ours(pixels, ids, mask).logits_per_image

    median = {name: statistics.median(times) for name, times in timings.items()}
    difference = {f"{kind}_embeds": float((results[f"ours_{kind}"]
                                           - torch.nn.functional.normalize(results[f"transformers_{kind}"], dim=-1))
                                          .abs().max()) for kind in ("image", "text")}
    difference["logits_per_image"] = float((logits - reference.logits_per_image).abs().max())
    report = {
        "model": "CLIP ViT-B/32 shape, random weights",
        "parameters_millions": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "threads": args.threads,
        "images_per_batch": args.images,
        "texts_per_batch": args.texts,
        "text_tokens": list(ids.shape),
        "repeats": args.repeats,
        "load_s": {"ours": round(load_ours, 2), "transformers": round(load_theirs, 2)},
        "median_ms": {name: round(1000 * value, 1) for name, value in median.items()},
        "ratio_ours_over_transformers": {
            kind: round(median[f"ours_{kind}"] / median[f"transformers_{kind}"], 3) for kind in ("image", "text")
        },
        "max_abs_diff": difference,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
