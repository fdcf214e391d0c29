"""A dual encoder's towers as ONNX graphs, and the ONNX Runtime path that runs them.

    multimodal export shapes-clip out/ --format onnx [--quantize int8]
    model = multimodal_models.load("out/", runtime="onnx")   # embed_images / embed_texts through ONNX Runtime

`export_onnx` writes the model folder as `save_pretrained` does (config, weights, tokenizer,
image processor: it still loads as a PyTorch model) plus `onnx/`:

    onnx/image_encoder.onnx    pixels (B, 3, S, S) float32 -> embeds (B, E), L2-normalised
    onnx/text_encoder.onnx     ids (B, T) int64, attention_mask (B, T) int64 -> embeds (B, E)
    onnx/export.json           what was exported: opset, inputs, outputs, quantization, model_type

Batch size and text length are dynamic. With quantize="int8" the graphs are quantized by ONNX
Runtime's dynamic int8 (weights int8 per channel, activations per batch).

`use_onnx(model, folder)` makes a loaded model compute its embeddings through those graphs: its
`encode_image` / `encode_text` run ONNX Runtime sessions, and everything above them
(`embed_images`, `classify`, the index, the server's /v1/embeddings) follows unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingDependencyError, MultimodalError, WrongModelError
from ..models.dual_encoder import DualEncoder

ONNX_DIRNAME = "onnx"
EXPORT_INFO = "export.json"
OPSET = 18
GRAPHS = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependencyError(f"{extra} needs the {module} package: pip install {module}") from None


# --- export -----------------------------------------------------------------------------------


def export_onnx(model, out: str | os.PathLike, *, quantize: str | None = None) -> Path:
    """Write `model` (a DualEncoder) to `out` with its towers as ONNX graphs; returns `out`."""
    if not isinstance(model, DualEncoder):
        raise WrongModelError(f"ONNX export covers dual encoders (their image and text towers); "
                              f"{type(model).__name__} is a {getattr(model, 'model_type', '?')} model")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize: expected int8, got {quantize!r}")
    if getattr(model, "quantized", None):
        raise ValueError("export the float32 model: ONNX Runtime quantizes the graph itself (--quantize int8)")
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    out = Path(out)
    model = model.float().cpu().eval()
    model.save_pretrained(out)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
    try:
        inputs = _example_inputs(model)
        _export_graph(_ImageTower(model).eval(), (inputs["pixels"],), staging / GRAPHS["image"],
                      {"pixels": {0: torch.export.Dim("batch")}})
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=model.config.text.max_length)
        _export_graph(_TextTower(model).eval(), (inputs["ids"], inputs["attention_mask"]), staging / GRAPHS["text"],
                      {"ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}})
        if quantize == "int8":
            for name in GRAPHS.values():
                _quantize_graph(staging / name)
        info = {"format": "onnx", "opset": OPSET, "model_type": model.model_type, "quantize": quantize,
                "graphs": {"image": {"file": GRAPHS["image"], "inputs": ["pixels"], "outputs": ["embeds"]},
                           "text": {"file": GRAPHS["text"], "inputs": ["ids", "attention_mask"],
                                    "outputs": ["embeds"]}}}
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        target = out / ONNX_DIRNAME
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # the graphs appear together or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


class _ImageTower(nn.Module):
    """pixels -> embeds: the model's own method, as a module torch.onnx can export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.encode_image(pixels)


class _TextTower(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask):
        return self.model.encode_text(ids, attention_mask)


def _example_inputs(model) -> dict:
    size = model.config.vision.image_size
    length = min(8, model.config.text.max_length)
    ids = torch.randint(1, 50, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2:] = 0
    return {"pixels": torch.zeros(2, 3, size, size), "ids": ids, "attention_mask": mask}


def _export_graph(module: nn.Module, args: tuple, path: Path, dynamic: dict) -> None:
    """One graph through torch.onnx's exporter (torch.export based); its inputs are named as the
    module's forward arguments, which `dynamic` (name -> {axis: Dim}) is keyed by."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=list(dynamic),
                                    output_names=["embeds"], dynamic_shapes=dynamic, verbose=False)
    program.save(str(path), external_data=False)  # one self-contained file per graph


def _quantize_graph(path: Path) -> None:
    _require("onnxruntime", "--quantize int8 of an ONNX export")
    from onnxruntime.quantization import QuantType, quantize_dynamic  # heavy: onnxruntime

    quantized = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
    os.replace(quantized, path)


# --- the runtime ------------------------------------------------------------------------------


class OnnxTowers:
    """ONNX Runtime sessions for an export's image and text graphs."""

    def __init__(self, folder: str | os.PathLike, *, threads: int | None = None):
        ort = _require("onnxruntime", "--runtime onnx")
        self.folder = Path(folder) / ONNX_DIRNAME
        info_file = self.folder / EXPORT_INFO
        if not info_file.is_file():
            raise FileNotFoundError(f"{info_file} not found: {folder} has no ONNX export; write one with "
                                    f"'multimodal export MODEL {folder} --format onnx'")
        self.info = json.loads(info_file.read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _torch_threads()
        options.inter_op_num_threads = 1
        self.sessions = {}
        for kind, graph in self.info["graphs"].items():
            path = self.folder / graph["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the ONNX export in {folder} is incomplete; export it again")
            self.sessions[kind] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        array = pixels.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.sessions["image"].run(None, {"pixels": array})[0])

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        feeds = {"ids": ids.detach().cpu().long().numpy(), "attention_mask": attention_mask.detach().cpu().long().numpy()}
        return torch.from_numpy(self.sessions["text"].run(None, feeds)[0])


def _torch_threads() -> int:
    return torch.get_num_threads()


def use_onnx(model, folder: str | os.PathLike, *, threads: int | None = None):
    """`model` (loaded from `folder`) with its embeddings computed by ONNX Runtime; returns it."""
    towers = OnnxTowers(folder, threads=threads)
    if towers.info.get("model_type") != model.model_type:
        raise MultimodalError(f"{folder}/onnx holds a {towers.info.get('model_type')} export, not this "
                              f"{model.model_type} model's; export it again")
    if model.device.type != "cpu":
        raise ValueError("--runtime onnx runs on the CPU here (CPUExecutionProvider); use --device cpu")
    model.encode_image = towers.encode_image  # the instance's methods: embed_images & co. call these
    model.encode_text = towers.encode_text
    model.runtime = "onnx"
    model.onnx = towers
    return model
