"""MultimodalModels: image+text AI you can run, train, evaluate and serve on a laptop CPU.

    import multimodal_models
    vlm = multimodal_models.load("shapes-vlm")
    vlm.caption("photo.png"); vlm.ask("photo.png", "how many circles are there?")
    for piece in vlm.chat([{"role": "user", "content": "<image> what is this?"}], images=["photo.png"], stream=True): ...
    clip = multimodal_models.load("shapes-clip")
    clip.classify("photo.png", ["a red circle", "a blue star"])
"""

from .version import __version__


def load(name_or_path, *, device: str = "cpu", dtype=None, expect: str | None = None):
    """A shipped model by name ("shapes-vlm", "shapes-clip"), a saved model folder, or a Hugging
    Face checkpoint (folder or hub id); dtype="bfloat16" halves its memory; expect="vlm" (or
    "dual_encoder", ...) refuses a model of another kind with a clear error."""
    from .loading import load as _load  # heavy: torch loads on first use, not on `import multimodal_models`

    return _load(name_or_path, device=device, dtype=dtype, expect=expect)


__all__ = ["load", "__version__"]
