"""`multimodal_models.load(name_or_path)`: a shipped model by name, a saved model folder, or a
Hugging Face CLIP/SigLIP checkpoint (a folder in that layout, or a hub id; see `pretrained`).

The shipped checkpoints are named here; the model types this package saves (config.json's
"model_type") are in `registry`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import registry
from .devices import resolve_device, resolve_dtype
from .errors import WrongModelError
from .export.onnx import use_onnx
from .models.quantize import QUANTIZE_CHOICES, quantize as quantize_model
from .pretrained import is_hf_checkpoint, load_hf, unsupported_layout
from .pretrained.clap import load_clap
from .pretrained.hub import looks_like_hub_id, resolve_checkpoint
from .pretrained.idefics3 import load_idefics3
from .pretrained.llava import load_llava
from .pretrained.whisper import MODEL_TYPE as WHISPER_MODEL_TYPE, load_whisper
from .pretrained.peft_adapters import adapter_base, apply_adapter, is_adapter_folder, read_adapter_config

if TYPE_CHECKING:
    import torch

SHIPPED_DIR = Path(__file__).parent / "checkpoints"
SHIPPED = {
    "shapes-clip": "dual encoder (CLIP-style) trained on the Shapes benchmark: retrieval, zero-shot classification",
    "shapes-vlm": "native multimodal LM trained on the Shapes benchmark: captions, answers, chat",
    "shapes-clip-small": "shapes-clip distilled into half its parameters (docs/distillation.md): retrieval",
}
DEFAULT_VLM = "shapes-vlm"
DEFAULT_DUAL_ENCODER = "shapes-clip"


def hf_vlm_loaders() -> dict[str, object]:
    """Hugging Face vision-language layouts (config.json "model_type") -> the function that loads one."""
    return {"llava": load_llava, "idefics3": load_idefics3, "smolvlm": load_idefics3}


def resolve(name_or_path: str | Path) -> Path:
    """The folder of a shipped model name, a local path, or a Hugging Face hub id ("org/name")."""
    text = str(name_or_path)
    if text in SHIPPED:
        folder = SHIPPED_DIR / text
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"the shipped model '{text}' is missing from {folder}; reinstall the package or retrain it with "
                f"'multimodal train configs/{text}.yaml'"
            )
        return folder
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if looks_like_hub_id(text):
        return resolve_checkpoint(text)
    raise FileNotFoundError(
        f"'{text}' is neither a shipped model ({', '.join(SHIPPED)}), a folder with a saved model, nor a "
        f"Hugging Face hub id ('org/name')"
    )


def base_reference(name_or_path: str | Path) -> str:
    """How an adapter names its base (base_model_name_or_path): a shipped name or a hub id as given, a
    local folder by its absolute path (so that the adapter loads from any working directory)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text in SHIPPED or not path.is_dir():
        return text
    return str(path.resolve())


def adapter_folder(adapter: str | Path) -> Path:
    """The local folder of an adapter, its adapter_config.json checked (before a base is loaded for it).
    Hub ids are not fetched for adapters: download the folder first."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        hint = (f" (download it first: hf download {adapter} --local-dir DIR, and pass DIR)"
                if looks_like_hub_id(str(adapter)) else "")
        raise FileNotFoundError(f"adapter '{adapter}' is not a folder{hint}")
    read_adapter_config(path)
    return path


RUNTIMES = ("torch", "onnx")


def load(name_or_path: str | Path, *, adapter: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, quantize: str | None = None, runtime: str = "torch",
         expect: str | None = None, needed_by: str = "this"):
    """Load a model, its tokenizer and its image preprocessing, ready to use (eval mode).

    adapter: a LoRA adapter folder in peft's layout (adapter_config.json + adapter_model.safetensors,
    written by peft or by a LoRA run here) to apply to the model: each update is folded into its
    layer's weight, after the cast to `dtype` and on `device`, so the model runs as fast as the base
    (pretrained/peft_adapters.py). An adapter folder passed as `name_or_path` is applied to the
    base its adapter_config.json names (base_model_name_or_path), as peft's AutoPeftModel does.

    device: "cpu", "cuda", "cuda:N", "mps" or "auto" (the accelerator when there is one); a
    device this machine lacks is refused with the list of those it has.

    dtype: "float32", "bfloat16" or "float16" (or a torch dtype) to cast the weights to; None
    keeps float32 (also for checkpoints stored in half precision, which are widened on load).
    bfloat16 halves the memory and works on CPUs; float16 is for GPUs.
    quantize: "int8" runs the linear layers in int8 on the CPU (models/quantize.py: about 2x faster
    than float32 on a ViT-B/32 tower, cosine to float32 above 0.999); device "auto" then means cpu.
    runtime: "onnx" computes a dual encoder's embeddings with ONNX Runtime from the graphs that
    `multimodal export MODEL FOLDER --format onnx` wrote into the folder (export/onnx.py).
    expect: the model_type the caller needs ("vlm", "dual_encoder", ...; a subclass such as
    "shapes_vlm" also does); another kind raises
    WrongModelError saying that `needed_by` (e.g. "--embedder", "the vqa task") needs it.
    """
    if adapter is None and is_adapter_folder(name_or_path):
        adapter, name_or_path = name_or_path, adapter_base(name_or_path)
    if adapter is not None:
        adapter = adapter_folder(adapter)
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if quantize is not None and runtime == "onnx":
        raise ValueError("--quantize applies to the PyTorch runtime; for ONNX Runtime, quantize the graphs when "
                         "exporting (multimodal export MODEL OUT --format onnx --quantize int8)")
    if (quantize is not None or runtime == "onnx") and str(device) == "auto":
        device = "cpu"  # int8 kernels and the ONNX Runtime path here are CPU ones
    device = resolve_device(device)
    if dtype is None:
        model = _load(name_or_path, device)
    else:
        import torch

        target = resolve_dtype(dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(target)  # modules are built, and checkpoint tensors cast, straight into `target`
        try:  # (torch's default dtype is process-wide: load from one thread at a time)
            model = _load(name_or_path, device)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(target)  # what the checkpoint's own code made in float32 (e.g. our saved models)
    if adapter is not None:
        apply_adapter(model, adapter, base_folder=resolve(name_or_path))
    if expect is not None and not isinstance(model, registry.model_class(expect)):
        raise WrongModelError(f"{name_or_path} is a {model.model_type} model; {needed_by} needs a {expect} model")
    if quantize is not None:
        quantize_model(model, quantize)
    if runtime == "onnx":
        use_onnx(model, resolve(name_or_path))
    return model


def _load(name_or_path: str | Path, device: torch.device):
    folder = resolve(name_or_path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {folder} is not a saved model folder")
    config = json.loads(config_file.read_text())
    if is_hf_checkpoint(config):  # transformers' CLIPModel / SiglipModel layout
        return load_hf(folder).to(device).eval()
    if config.get("model_type") in ("llava", "idefics3", "smolvlm"):  # LLaVA / Idefics3 / SmolVLM layout
        return hf_vlm_loaders()[config["model_type"]](folder, config).to(device).eval()
    if config.get("model_type") == "clap":  # ClapModel: the audio-text dual encoder
        return load_clap(folder, config).to(device).eval()
    if config.get("model_type") == WHISPER_MODEL_TYPE:  # WhisperForConditionalGeneration: speech to text
        return load_whisper(folder, config).to(device).eval()
    model_type = config.get("model_type")
    if model_type not in registry.MODEL_TYPES:
        raise unsupported_layout(config_file, config, sorted(registry.MODEL_TYPES))  # names the layouts we read
    return registry.model_class(model_type).from_pretrained(folder).to(device).eval()
