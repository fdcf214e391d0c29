"""Putting a Hugging Face checkpoint's tensors into our modules by an explicit key table, with
every key and shape checked both ways (no `strict=False`). Reading the safetensors files is
`checkpoint.read_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import DataFormatError
from .checkpoint import hf_shape


def expand_rows(table, depth: int, hf_prefix: str = "", placeholder: str = "{v}") -> list[tuple[str, str, str | None]]:
    """(hf_key, our_key, rule) rows of a family's KEY_MAP with the layer placeholder spelled out for
    `depth` layers and `hf_prefix` put before every HF key."""
    rows = []
    for entry in table:
        hf, ours, rule = (*entry, None) if len(entry) == 2 else entry
        if placeholder in hf:
            rows += [(hf_prefix + hf.replace(placeholder, str(i)), ours.replace(placeholder, str(i)), rule)
                     for i in range(depth)]
        else:
            rows.append((hf_prefix + hf, ours, rule))
    return rows


def rename_keys(tensors: dict[str, torch.Tensor], rename: Callable[[str], str], source: Path) -> dict[str, torch.Tensor]:
    """Apply `rename` to every key (normalising a layout); two keys landing on one name is an error."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        new = rename(key)
        if new in renamed:
            raise DataFormatError(source, f"holds the tensor {new!r} twice (under two names)")
        renamed[new] = tensor
    return renamed


def assign_weights(module: nn.Module, tensors: dict[str, torch.Tensor], rows: list[tuple[str, str, str | None]],
                   source: Path, *, transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                   optional: frozenset[str] | set[str] = frozenset()) -> None:
    """Copy tensors[hf_key] into the module's tensor our_key for every (hf_key, our_key, rule) row.

    Every checkpoint key must be in the rows (`optional` keys may be absent or present and
    unused: buffers of old checkpoints, a tied lm_head stored anyway), every tensor of the module
    must be written (tied parameters once), and every shape must match (`rule` as in
    checkpoint.hf_shape: SQUEEZE drops our leading 1-dims). `transforms[hf_key]` adapts a tensor
    after the shape check (a reordered position table).
    """
    transforms = transforms or {}
    own = module.state_dict()
    unknown = sorted({ours for _, ours, _ in rows} - set(own))
    if unknown:
        raise RuntimeError(f"the key table names tensors the model does not have: {unknown[:10]}")
    wanted = {hf for hf, _, _ in rows}
    missing = sorted(wanted - set(tensors))
    unexpected = sorted(set(tensors) - wanted - set(optional))
    if missing or unexpected:
        raise DataFormatError(source, f"the weights do not match config.json: missing {_names(missing)}; "
                                      f"unexpected {_names(unexpected)}")
    written = {own[ours].data_ptr() for _, ours, _ in rows}
    unwritten = sorted(name for name, tensor in own.items() if tensor.data_ptr() not in written)
    if unwritten:  # a gap in the key table, not in the checkpoint
        raise RuntimeError(f"the key table leaves model tensors unset: {unwritten[:10]}")
    with torch.no_grad():
        for hf, ours, rule in rows:
            tensor, target = tensors[hf], own[ours]
            expected = hf_shape(rule, tuple(target.shape))
            if tuple(tensor.shape) != expected:
                raise DataFormatError(source, f"shape {tuple(tensor.shape)} where config.json implies {expected} "
                                              f"(for our {ours})", field=hf)
            tensor = tensor.reshape(target.shape)
            if hf in transforms:
                tensor = transforms[hf](tensor)
            target.copy_(tensor.to(target.dtype))


def export_tensors(module: nn.Module, rows: list[tuple[str, str, str | None]]) -> dict[str, torch.Tensor]:
    """{hf_key: tensor} for the rows (the inverse of assign_weights, shapes as HF stores them)."""
    own = module.state_dict()
    return {hf: own[ours].detach().reshape(hf_shape(rule, tuple(own[ours].shape))).contiguous().cpu().clone()
            for hf, ours, rule in rows}


def _names(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
