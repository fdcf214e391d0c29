"""`make demo` / `multimodal demo`: the product a newcomer meets.

Generates a small Shapes collection (a seed the shipped models never trained on), indexes its
images with the shipped dual encoder (captions written by the shipped VLM), starts the server
(web page + API) on loopback and prints its address. A rerun reuses the collection and only
refreshes the index (which is incremental), so it starts in seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

from .shapes.generate import ShapesConfig, generate
from .index import ImageIndex
from .loading import DEFAULT_DUAL_ENCODER, DEFAULT_VLM, load
from .serve import Settings, run

DEMO_SEED = 12345  # not the seed the shipped checkpoints were trained on (0)


def generate_collection(out: Path, *, images: int, seed: int = DEMO_SEED) -> Path:
    """A Shapes collection of `images` test images under out/shapes; returns the image folder."""
    data = out / "shapes"
    folder = data / "images" / "test"
    if (data / "dataset.json").exists() and len(list(folder.glob("*.png"))) == images:
        print(f"1/3 the Shapes collection in {data} is there ({images} images)")
        return folder
    print(f"1/3 generating a Shapes collection of {images} images in {data} ...")
    start = time.perf_counter()
    generate(ShapesConfig(seed=seed, train=0, val=0, test=images, test_compositional=0), data)
    print(f"    done in {time.perf_counter() - start:.1f} s")
    return folder


def index_collection(folder: Path, index_dir: Path, *, quiet: bool = False) -> None:
    print(f"2/3 indexing {folder} with {DEFAULT_DUAL_ENCODER} (captions by {DEFAULT_VLM}) into {index_dir} ...")
    with ImageIndex.open(index_dir, create=True) as index:
        embedder, captioner = load(DEFAULT_DUAL_ENCODER, expect="dual_encoder"), load(DEFAULT_VLM, expect="vlm")
        report = index.update(folder, embedder, model_name=DEFAULT_DUAL_ENCODER, captioner=captioner,
                              captioner_name=DEFAULT_VLM, progress=not quiet)
    print(f"    {report.total} images indexed: {report.embedded} embedded, {report.captioned} captioned, "
          f"{report.unchanged} unchanged, {report.removed} removed ({report.seconds:.1f} s)")


def run_demo(out: Path, *, images: int = 300, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(model=DEFAULT_VLM, index=str(out / "index"), host=host, port=port)
    settings.check()  # an unsafe address is refused before any work
    folder = generate_collection(out, images=images)
    index_collection(folder, out / "index", quiet=quiet)
    print("3/3 starting the server (Ctrl-C stops it) ...")
    settings.image_roots = (str(folder),)
    run(settings)
