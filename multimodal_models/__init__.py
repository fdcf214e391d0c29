"""MultimodalModels: image+text AI you can run, train, evaluate and serve on a laptop CPU.

    import multimodal_models
    vlm = multimodal_models.load("shapes-vlm")
    vlm.caption("photo.png"); vlm.ask("photo.png", "how many circles are there?")
    for piece in vlm.chat([{"role": "user", "content": "<image> what is this?"}], images=["photo.png"], stream=True): ...
    clip = multimodal_models.load("shapes-clip")
    clip.classify("photo.png", ["a red circle", "a blue star"])
    run = multimodal_models.train("configs/shapes-vqa.yaml", output="runs/mine", train={"steps": 200})
    multimodal_models.load(run["model"])
"""

from .version import __version__


def load(name_or_path, *, device: str = "cpu", dtype=None, expect: str | None = None, **options):
    """A shipped model by name ("shapes-vlm", "shapes-clip"), a saved model folder, or a Hugging
    Face checkpoint (folder or hub id); device="auto" takes the accelerator when there is one;
    dtype="bfloat16" halves its memory; expect="vlm" (or "dual_encoder", ...) refuses a model of
    another kind with a clear error. See multimodal_models.loading.load for the other options."""
    from .loading import load as _load  # heavy: torch loads on first use, not on `import multimodal_models`

    return _load(name_or_path, device=device, dtype=dtype, expect=expect, **options)


def train(config, *, resume: bool = False, progress: bool = True, callbacks=(), **overrides) -> dict:
    """Train (or with resume=True continue) a run, as `multimodal train` does, and return its summary.

    config: a YAML file, a dict of the same shape, or a RunConfig. Keyword arguments override
    its sections: `train(..., output="runs/mine", train={"steps": 200})`, or one key at a time
    with "__" between levels: `train__steps=200`.
    callbacks: Callback objects (multimodal_models.training.callbacks) or functions
    `(step, record)` called with every log record; TensorBoard logs are written to
    OUTPUT/tensorboard when tensorboard is installed (train.tensorboard: false turns them off).

    Returns {"output", "steps_done", "best", "model" (the exported folder, for `load`),
    "final_eval"}.
    """
    from .training.config import as_config  # heavy: torch
    from .training.loop import train as _train  # heavy: torch

    return _train(as_config(config, overrides), resume=resume, progress=progress, callbacks=callbacks)


def remote_images(fetch=None):
    """A context in which chat image parts naming an http(s) URL are fetched (by `fetch(url) -> bytes`,
    default a plain GET of at most 20 MB); outside it the library makes no network request for them."""
    from .models.chat import remote_images as _remote_images  # heavy: torch

    return _remote_images(fetch)


__all__ = ["load", "remote_images", "train", "__version__"]
