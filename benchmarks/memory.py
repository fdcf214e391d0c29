"""CPU memory of a loaded checkpoint in float32 and bfloat16: weights, and the process's peak.

    .venv/bin/python benchmarks/memory.py [--family clip|siglip] [--keep DIR]

A checkpoint of a real size (the default: CLIP ViT-B/32, 151 M parameters; siglip: SigLIP
base/16-224, 203 M) with random weights is saved in the Hugging Face layout (float32, as
`transformers` writes it). Each dtype is measured in a fresh process: the resident set size
(RSS) after `import torch, multimodal_models`, then after `multimodal_models.load(folder,
dtype=...)` plus one image and one text embedded, and the peak RSS (ru_maxrss) of the whole
process. "weights" is parameters x bytes per parameter, the floor any runtime needs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import gc, json, resource, sys
import torch, multimodal_models
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
torch.set_num_threads(1)
base = rss_mb()
model = multimodal_models.load(sys.argv[1], dtype=sys.argv[2])
from PIL import Image
with torch.no_grad():
    model.embed_images([Image.new("RGB", (224, 224), (200, 30, 30))])
    model.embed_texts(["a red square"])
gc.collect()
params = sum(p.numel() for p in model.parameters())
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"dtype": sys.argv[2], "parameters": params, "weights_mb": round(weights, 1),
                  "loaded_rss_mb": round(rss_mb() - base, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 1)}))
"""


def make_checkpoint(family: str, folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "clip":
        sys.path.insert(0, str(Path(__file__).parent))
        from pretrained_clip import make_checkpoint as make_clip

        make_clip(folder)
        return
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz▁")}}
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=64)
    transformers.SiglipModel(transformers.SiglipConfig()).save_pretrained(folder)
    fast.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--keep", type=Path, default=None, help="write the checkpoint here (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        if not (folder / "config.json").exists():
            make_checkpoint(args.family, folder)
        rows = []
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), dtype], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"family": args.family, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
