"""Which device and dtype a model runs on: the names users type (`--device`, `--dtype`) -> torch's.

    cpu            this machine's processor
    cuda, cuda:N   an NVIDIA (or ROCm) GPU; plain "cuda" is the current one
    mps            Apple silicon
    auto           the first accelerator present (cuda, then mps), else cpu

A device that was named but is missing is an error that says which devices this machine has,
instead of torch's lower-level message on the first tensor moved there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES_HELP = "cpu, cuda, cuda:N, mps or auto (the accelerator when there is one)"
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def available_devices() -> list[str]:
    """The devices this process can use, in the order `auto` prefers them (cpu last)."""
    import torch

    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: "str | torch.device | None") -> "torch.device":
    """The torch device for a user's `--device` value (None and "auto" pick the accelerator if any)."""
    import torch

    if isinstance(name, torch.device):
        return name
    text = "auto" if name is None else str(name).strip().lower()
    have = available_devices()
    if text == "auto":
        return torch.device(have[0])
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cuda", "mps") or (index and not index.isdigit()) or (kind == "mps" and index not in ("", "0")):
        raise ValueError(f"--device: expected {DEVICE_CHOICES_HELP}, got {name!r}")
    if kind == "mps":
        if "mps" not in have:
            raise ValueError(f"--device mps: this machine has no Apple GPU (available: {', '.join(have)})")
        return torch.device("mps")
    wanted = f"cuda:{index or (torch.cuda.current_device() if torch.cuda.is_available() else 0)}"
    if wanted not in have:
        raise ValueError(f"--device {text}: this machine has no such GPU (available: {', '.join(have)})")
    return torch.device(wanted)


def resolve_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype | None":
    """A torch dtype for "float32" / "bfloat16" / "float16" (and fp32 / bf16 / fp16); None stays None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return names[dtype]


def add_device_arguments(parser, *, dtype: bool = True) -> None:
    """`--device` (and `--dtype`) for a command that loads a model, with the same help everywhere."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help=f"where the model runs: {DEVICE_CHOICES_HELP} (default auto)")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                            help="weights' dtype: bfloat16 halves the memory; float16 is for GPUs (default float32)")


def add_runtime_arguments(parser) -> None:
    """`--quantize` and `--runtime` for a command that runs a model (loading.load takes both)."""
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="int8: the linear layers in int8 on the CPU, about twice as fast as float32 "
                             "(default: none)")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                        help="onnx: a dual encoder's embeddings by ONNX Runtime, from the graphs "
                             "'multimodal export MODEL DIR --format onnx' wrote into DIR (default torch)")
