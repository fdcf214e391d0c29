"""The parts every model here is built from: norms, rotary positions, attention with a KV
cache, MLPs and the pre-norm transformer block.

Shapes in comments: B batch, T query length, S key length, H heads, D head dim, C width.
Masks are boolean and broadcastable to (B, H, T, S); True means "may attend" (or, for packed
training rows, a PackedAttention: the same mask cut into the blocks it lets through).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .packed_attention import PackedAttention, rows


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama, Qwen2): x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps), one kernel
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's gelu_pytorch_tanh
    # OpenAI CLIP. silu(1.702 x) / 1.702 is the same function in half the time on CPU, but its rounding
    # moves a LLaVA-1.5-shaped model's logits 1.3e-5 from transformers' (parity is 1e-5): kept as written
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) in the rotate-half layout used by Llama and Qwen2."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) must not round the frequencies: they stay float32."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.inv_freq = self._frequencies(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, D) in float32."""
        freqs = positions.float()[..., None] * self.inv_freq  # (B, T, D/2)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def causal_mask(queries: int, keys: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """(queries, keys) bool mask, True where attention is allowed: the queries are the last
    `queries` positions of `keys` (those before them are a cached prefix), each sees itself
    and everything earlier."""
    keys = queries if keys is None else keys
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


class KVCache:
    """Keys and values of every decoder layer, preallocated up to `max_length` positions."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0  # positions filled, shared by all layers
        self.max_length = max_length
        # batch-first tensors that later steps need besides keys and values (what a block hook
        # reads, e.g. an image's tokens); reorder() keeps them in step with the beams
        self.context: tuple[torch.Tensor, ...] | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) after the cached positions; return everything cached so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} were needed")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        """Call once per forward pass, after every layer has stored its keys and values."""
        self.length += steps

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` (beam search)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        if self.context is not None:
            self.context = tuple(c.index_select(0, index) for c in self.context)


class BatchedKVCache:
    """The caches of several independent sequences side by side, each row at its own length: the
    decode batch of continuous batching. Rows 0..size-1 are in use; a sequence joins with the
    one-row `KVCache` its prompt was run into (`add`) and leaves by `remove` (the last row moves into
    its place). A decoding step feeds one token per row: `update` writes each row's keys and values
    at that row's own length, and `attention_mask()` lets each row see its own positions only, so a
    row's logits are those it would get alone. Storage grows as rows and lengths need it.

    `context` holds, as KVCache's does, batch-first tensors a block hook keeps for later steps; rows
    whose contexts differ in length along dim 1 are padded there with zeros (False), which the hook
    must read as "nothing there" (ShapesVLM's image readers do: their `valid` mask is False there)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_length, self.dtype, self.device = max_length, dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # positions filled, per row in use
        self._context: list[torch.Tensor] | None = None
        self._step: tuple[torch.Tensor, torch.Tensor, int] | None = None  # rows, write positions, keys seen
        self._reserve(1, 1)

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The longest row's length (what a caller that assumes one length would read)."""
        return max(self.lengths, default=0)

    @property
    def context(self) -> tuple[torch.Tensor, ...] | None:
        return None if self._context is None else tuple(c[: self.size] for c in self._context)

    def _reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` positions (doubling, up to max_length)."""
        have_rows = self.keys[0].shape[0] if self.keys else 0
        have_length = self.keys[0].shape[2] if self.keys else 0
        if rows <= have_rows and length <= have_length:
            return
        if length > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {length} were needed")
        new_rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        new_length = min(self.max_length, max(length, 2 * have_length, 64)) if length > have_length else have_length
        shape = (new_rows, self.kv_heads, new_length, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if store and layer < len(store):
                    old = store[layer]
                    grown[: old.shape[0], :, : old.shape[2]] = old
                    store[layer] = grown
                else:
                    store.append(grown)
        if self._context is not None:
            self._context = [self._padded(c, new_rows, c.shape[1]) for c in self._context]

    @staticmethod
    def _padded(tensor: torch.Tensor, rows: int, width: int) -> torch.Tensor:
        """tensor with its dims 0 and 1 grown to rows and width, the new entries zero (False)."""
        if tensor.shape[0] >= rows and tensor.shape[1] >= width:
            return tensor
        grown = tensor.new_zeros((max(rows, tensor.shape[0]), max(width, tensor.shape[1]), *tensor.shape[2:]))
        grown[: tensor.shape[0], : tensor.shape[1]] = tensor
        return grown

    def add(self, cache: KVCache, row: int = 0, length: int | None = None) -> int:
        """Copy row `row` of a filled KVCache (its first `length` positions, default all it holds, and its
        context) in as a new row; returns its index."""
        index, length = self.size, cache.length if length is None else length
        self._reserve(index + 1, length + 1)
        for layer in range(self.layers):
            self.keys[layer][index, :, :length] = cache.keys[layer][row, :, :length]
            self.values[layer][index, :, :length] = cache.values[layer][row, :, :length]
        self.lengths.append(length)
        given = cache.context
        if given is not None and self._context is None:  # the first row with a context: the others have none
            rows = self.keys[0].shape[0]
            self._context = [c.new_zeros((rows, *c.shape[1:])) for c in given]
        if self._context is not None:
            if given is not None and len(given) != len(self._context):
                raise ValueError("sequences in one batch must keep contexts of the same kind")
            for j, stored in enumerate(self._context):
                if given is not None:
                    stored = self._context[j] = self._padded(stored, stored.shape[0], given[j].shape[1])
                stored[index] = 0
                if given is not None:
                    stored[index, : given[j].shape[1]] = given[j][row]
        self._step = None
        return index

    def remove(self, index: int) -> None:
        """Drop row `index`; the last row moves into its place."""
        last = self.size - 1
        if index != last:
            length = self.lengths[last]
            for store in (self.keys, self.values):
                for tensor in store:
                    tensor[index, :, :length] = tensor[last, :, :length]
            self.lengths[index] = length
            if self._context is not None:
                for stored in self._context:
                    stored[index] = stored[last]
        self.lengths.pop()
        if not self.lengths:
            self._context = None
        self._step = None

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self._step is None:
            at = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
            self._reserve(self.size, self.length + 1)
            self._step = (torch.arange(self.size, device=self.device), at, self.length + 1)
        return self._step

    def positions(self) -> torch.Tensor:
        """(size, 1): the position of each row's next token (its length)."""
        return self._positions()[1][:, None]

    def attention_mask(self) -> torch.Tensor:
        """(size, S) bool: each row's new token sees that row's cached positions and itself."""
        _, at, end = self._positions()
        return torch.arange(end, device=self.device)[None, :] <= at[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (size, Hkv, 1, D) at each row's length; return the keys and values every row may
        need, (size, Hkv, S, D) (attention_mask() says which)."""
        rows, at, end = self._positions()
        if k.shape[0] != self.size or k.shape[2] != 1:
            raise ValueError(f"a batched step feeds one token to each of the {self.size} rows, got {tuple(k.shape)}")
        self.keys[layer][rows, :, at] = k[:, :, 0]
        self.values[layer][rows, :, at] = v[:, :, 0]
        return self.keys[layer][: self.size, :, :end], self.values[layer][: self.size, :, :end]

    def advance(self, steps: int) -> None:
        self.lengths = [length + steps for length in self.lengths]
        self._step = None

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError("a batch of independent sequences is not reordered (beam search uses KVCache)")


class Attention(nn.Module):
    """Multi-head attention: self-attention (optionally causal, grouped-query, rotary, cached)
    or cross-attention to a context of another width."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, context_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, head_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"{heads} query heads cannot share {self.kv_heads} key/value heads evenly")
        self.head_dim = head_dim or dim // heads
        context_dim = context_dim or dim
        self.q = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.k = nn.Linear(context_dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v = nn.Linear(context_dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.out = nn.Linear(heads * self.head_dim, dim, bias=out_bias)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None,
                mask: torch.Tensor | PackedAttention | None = None, causal: bool = False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None,
                layer: int = 0, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: only these positions' outputs (indices into the flattened (B * T)), as (1, M, C)."""
        B, T, _ = x.shape
        source = x if context is None else context
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k(source).view(B, source.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v(source).view(B, source.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.update(layer, k, v)
        grouped = self.kv_heads != self.heads  # grouped-query attention: each k/v head serves a group of queries
        if isinstance(mask, PackedAttention):  # packed training rows: only the blocks the mask lets through
            if cache is not None or causal or context is not None:
                raise ValueError("packed attention is for self-attention over packed rows, without a cache")
            if grouped:
                k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            y = mask.attend(q, k, v)
            return self._output(y, keep)
        if causal and (offset > 0 and T > 1 or mask is not None):
            # causal with an offset (cached prefix) or combined with a padding mask: spell it out
            allowed = causal_mask(T, k.shape[2], x.device)
            mask = allowed if mask is None else mask & allowed
            causal = False
        elif causal and offset > 0:  # one new token attends to everything cached
            causal = False
        # enable_gqa: the kernel reads each k/v head for its group instead of a copy of the whole cache per step
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped)  # (B, H, T, D)
        return self._output(y, keep)

    def _output(self, y: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The heads' outputs (B, H, T, D) side by side, at the kept positions, through the output projection."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.out(y if keep is None else rows(y.flatten(0, 1), keep)[None])


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (ViT, CLIP, GPT-2)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) (SwiGLU: Llama, Qwen2)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    """Pre-norm block, each step a residual update:
    x = x + attn(norm1(x));  [x = x + cross_attn(cross_norm(x), context)];  x = x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 mlp: str = "gelu", act: str = "gelu", kv_heads: int | None = None, qkv_bias: bool = True,
                 out_bias: bool = True, mlp_bias: bool = True, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.attn = Attention(dim, heads, kv_heads=kv_heads, qkv_bias=qkv_bias, out_bias=out_bias)
        self.cross_norm = make_norm(norm, dim, norm_eps) if context_dim else None
        self.cross_attn = (
            Attention(dim, heads, context_dim=context_dim, qkv_bias=qkv_bias, out_bias=out_bias) if context_dim else None
        )
        self.norm2 = make_norm(norm, dim, norm_eps)
        if mlp == "gelu":
            self.mlp = MLP(dim, mlp_hidden, act, bias=mlp_bias)
        elif mlp == "gated":
            self.mlp = GatedMLP(dim, mlp_hidden, act, bias=mlp_bias)
        else:
            raise ValueError(f"unknown mlp {mlp!r}; expected 'gelu' or 'gated'")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None,
                layer: int = 0, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: the positions (indices into x.flatten(0, 1)) whose outputs are wanted, for a last
        block whose other outputs nothing reads: the attention's output projection and the MLP then
        run on those only, and x comes back as (1, M, C). Every position is still attended to."""
        if keep is not None and self.cross_attn is not None and context is not None:
            raise ValueError("keep is for self-attention blocks: cross-attention reads the image per row")
        attended = self.attn(self.norm1(x), mask=mask, causal=causal, rotary=rotary, cache=cache, layer=layer, keep=keep)
        x = (x if keep is None else rows(x.flatten(0, 1), keep)[None]) + self.dropout(attended)
        if self.cross_attn is not None and context is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), context=context, mask=context_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style initialisation for models trained from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos position table (length, dim), for models that want no learned positions."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table
