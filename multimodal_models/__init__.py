"""MultimodalModels: image+text AI you can run, train, evaluate and serve on a laptop CPU."""

__version__ = "0.1.0"
