"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al., 2021).

A wrapped layer computes  y = W x + b + (alpha / rank) * B A dropout(x)  with W, b frozen and
only A (rank x in) and B (out x rank) trained. B starts at zero, so the wrapped model starts
out computing exactly what the original did. `merge` folds the update into W (no extra cost
at inference), `unmerge` takes it out again.

    trainable = apply_lora(model.decoder, targets=("q", "k", "v", "out"), rank=8, alpha=16)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ...
    merge_lora(model.decoder)             # plain nn.Linear layers again, ready to save

A `LoRALinear` is an nn.Linear that keeps the original `weight` and `bias` parameters (the
same tensors, same state-dict names) and adds `lora_a` / `lora_b`; after `merge_lora` the
model's state dict has exactly the keys it had before `apply_lora`. `lora_modules` finds them by
module path, and `wrap_linear` wraps one layer by its path (an adapter file names its layers so):
`pretrained/peft_adapters.py` writes and reads them in peft's adapter layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update; the original weight and bias stay frozen."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, *,
                 scale: float | None = None):
        """scale: the update's factor where it is not alpha / rank (rsLoRA's alpha / sqrt(rank))."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        nn.Module.__init__(self)  # no fresh weight: the base layer's parameters are reused
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r): starts as a no-op
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.rank = rank
        self.scale = alpha / rank if scale is None else scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta(self) -> torch.Tensor:
        """The update to the weight, (out, in), in float32 (a half-precision weight is rounded once, on merging)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight (forward then costs what the plain layer costs)."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the weight again (to go on training the adapters)."""
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (the same parameter objects)."""
        self.merge()
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta")  # no allocation: the parameters are replaced just below
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


@dataclass
class LoRAConfig:
    """What `apply_lora` adapts and how (a training task's `lora` option)."""

    targets: tuple[str, ...] = ("q", "k", "v", "out")  # attribute names of the nn.Linear layers to wrap
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # the run's model/ folder: the base with the adapter merged in (true), or the adapter alone (false;
    # load() applies it to its base). The adapter alone is also written to adapter/ either way.
    merge: bool = True


def apply_lora(model: nn.Module, targets: tuple[str, ...] = ("q", "k", "v", "out"), rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> list[nn.Parameter]:
    """Freeze every parameter of `model` and wrap the nn.Linear layers whose attribute name is in
    `targets` (e.g. "q", "k", "v", "out" of the attention layers; "gate", "up", "down" of a SwiGLU
    MLP; "fc1", "fc2"); returns the LoRA parameters, the only trainable ones.

    Pass the part to adapt (`vlm.decoder`): the names are matched anywhere below `model`.
    A layer whose weight is shared with another module (a tied output layer) is not wrapped.
    """
    targets = tuple(targets)
    if not targets:
        raise ValueError("no target module names given")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    shared = shared_weights(model)
    found: set[str] = set()
    trainable: list[nn.Parameter] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in targets or not isinstance(child, nn.Linear):
                continue
            if isinstance(child, LoRALinear):
                raise ValueError("the model already has LoRA adapters; merge_lora() it first")
            if id(child.weight) in shared:
                continue
            wrapped = LoRALinear(child, rank=rank, alpha=alpha, dropout=dropout)
            setattr(parent, name, wrapped)
            trainable += [wrapped.lora_a, wrapped.lora_b]
            found.add(name)
    missing = sorted(set(targets) - found)
    if missing:
        raise ValueError(f"no nn.Linear layers named {missing} in the model (LoRA targets {list(targets)})")
    return trainable


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers by module path ("decoder.blocks.0.attn.q"), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def wrap_linear(model: nn.Module, path: str, rank: int, alpha: float, dropout: float = 0.0, *,
                scale: float | None = None) -> LoRALinear:
    """Wrap the nn.Linear at `path` (a module path below `model`) in a LoRALinear and return it. Unlike
    `apply_lora` this freezes nothing else; a layer whose weight another module shares is refused."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    child = getattr(parent, name, None)
    if not isinstance(child, nn.Linear):
        raise ValueError(f"{path} is not an nn.Linear layer of the model")
    if isinstance(child, LoRALinear):
        raise ValueError(f"{path} already has a LoRA adapter; merge_lora() it first")
    if id(child.weight) in shared_weights(model):
        raise ValueError(f"{path} shares its weight with another module (tied embeddings); LoRA cannot adapt it")
    wrapped = LoRALinear(child, rank=rank, alpha=alpha, dropout=dropout, scale=scale)
    setattr(parent, name, wrapped)
    return wrapped


def merge_lora(model: nn.Module, *, unload: bool = True) -> nn.Module:
    """Fold every adapter into its weight. unload=True (default) also swaps the LoRA layers for
    plain nn.Linear ones, so the state dict is the original model's again; unload=False keeps
    them (merged; `unmerge_lora` takes the updates out again)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                if unload:
                    setattr(parent, name, child.to_linear())
                else:
                    child.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied embeddings)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}
