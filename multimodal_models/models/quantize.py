"""Post-training quantization: `quantize(model, "int8")` for every model this package builds.

"int8" is dynamic quantization of the linear layers: weights stored as int8 (per output channel),
activations quantized per batch as they come, int8 matrix products (fbgemm / oneDNN, x86 CPUs).
A ViT's patch embedding, a convolution whose kernel equals its stride, is one linear map per
patch: it is rewritten as such (exactly) so that it is quantized too. Norms, attention scores
and embeddings stay float32.

Why torch.ao's dynamic quantization and not torchao or ONNX Runtime: on a ViT-B/32-shaped CLIP
image tower (batch 8, one thread, this project's 2-core x86 CPU with AVX-512 VNNI, 2026-12-08)
it ran in 239 ms against 349 ms for torchao's Int8DynamicActivationInt8Weight (eager; its speed
needs torch.compile), 537 ms for torchao's int8 weight-only, 235 ms for ONNX Runtime's dynamic
int8 after an export that takes 10 s, and 526 ms for float32; all within cosine 0.9996 of
float32. It works in place on the model a user already has, with no export step.
benchmarks/quantization.py measures it against transformers in one run.

Decoding (batch 1, one token: a matrix-vector product per layer) keeps the same choice. On the
linear layers of a SmolLM2-135M-shaped decoder step (30 x q/k/v/o/gate/up/down + a 49,280-word
lm_head, 134 M weights, too many for the caches), CPU milliseconds per step, one thread, same
process, 2026-12-08: float32 41.5, torch.ao dynamic int8 17.1-20.0 (x86 / fbgemm engine; oneDNN
25.0), aten._weight_int8pack_mm weight-only int8 with bfloat16 activations 29.6 (with float32
activations it is several times slower still), fp16 dynamic 36.4, bfloat16 44.2, and int4
weight-only (aten._weight_int4pack_mm_for_cpu, groups of 64, bfloat16 activations) 11.1. Every
linear layer gains, the lm_head included (2.6-6.6x alone), so none is left in float32. What int8
leaves of a decode step is mostly outside the linear layers (benchmarks/vlm_decode.py, docs/
performance.md "Quantized and exported inference"); int4 is the next step for decoders.
"""

from __future__ import annotations

import gc
import warnings

import torch
from torch import nn

QUANTIZE_CHOICES = ("int8",)


class PatchLinear(nn.Module):
    """A patch embedding (Conv2d with kernel == stride, no padding) as a linear map of each
    flattened patch: the same numbers, and a layer dynamic quantization can take."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size
        self.linear = nn.Linear(conv.in_channels * self.patch[0] * self.patch[1], conv.out_channels,
                                bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        ph, pw = self.patch
        gh, gw = h // ph, w // pw
        patches = pixels[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)  # (c, kh, kw) as the conv's
        out = self.linear(patches)  # (B, gh*gw, out)
        return out.transpose(1, 2).reshape(b, -1, gh, gw)  # the conv's (B, out, gh, gw)


def _is_patch_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.groups == 1
            and module.dilation == (1, 1) and module.padding in ((0, 0), "valid") and module.kernel_size != (1, 1))


def _replace_patch_convs(module: nn.Module) -> int:
    replaced = 0
    for name, child in module.named_children():
        if _is_patch_conv(child):
            setattr(module, name, PatchLinear(child))
            replaced += 1
        else:
            replaced += _replace_patch_convs(child)
    return replaced


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """The model with its linear layers (and patch embeddings) in int8, on the CPU, in eval mode.

    The model must be float32 on the CPU (int8 kernels run there; the other layers stay float32).
    It is changed in place and returned. Tied weights (a decoder's output layer and its input
    embedding) are untied: the output layer is quantized, the embedding stays float32.
    """
    if method not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got {method!r}")
    parameters = list(model.parameters())
    if any(p.device.type != "cpu" for p in parameters):
        raise ValueError("quantize='int8' runs on the CPU (the int8 kernels are x86/ARM CPU kernels); "
                         "load the model with device='cpu'")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in parameters):
        raise ValueError("quantize='int8' starts from float32 weights (the layers it leaves alone stay float32); "
                         "don't combine it with dtype=bfloat16 / float16")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # heavy: torch.ao

    model.eval()
    _replace_patch_convs(model)
    engine = torch.backends.quantized.engine
    if engine not in torch.backends.quantized.supported_engines or engine == "none":
        torch.backends.quantized.engine = torch.backends.quantized.supported_engines[-1]
    with warnings.catch_warnings():  # torch marks torch.ao's quantized tensors as deprecated in favour of torchao
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    model.quantized = method
    # quantize_dynamic leaves the float32 layers it replaced in reference cycles: without a collection
    # their weights stay in memory until the collector happens to run (a SmolVLM-256M-shaped model:
    # 1.49 GB resident after load(quantize="int8"), 0.65 GB after this)
    gc.collect()
    return model


def quantized_linear_count(model: nn.Module) -> int:
    """How many linear layers run in int8 (0 for a model that was not quantized)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in model.modules())
