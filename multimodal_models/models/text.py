"""Text transformers: an encoder (CLIP-style, pooled to one vector) and a causal decoder LM.

The encoder embeds tokens, runs (optionally causal) pre-norm blocks and pools at the end
of text (the last real token, where CLIP puts its end-of-text token), the first token,
the last position, or the mean. The decoder is a GPT/Llama-style language model with a
KV cache; its options (RMSNorm, SwiGLU, rotary positions, grouped-query attention, qkv
bias) cover the Llama and Qwen2 layouts as well as the small models trained here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .layers import BatchedKVCache, KVCache, RotaryEmbedding, TransformerBlock, init_weights, make_norm
from .packed_attention import PackedAttention, rows


@dataclass
class TextEncoderConfig:
    vocab_size: int = 1000
    max_length: int = 32
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    mlp_hidden: int | None = None  # MLP width; None: int(width * mlp_ratio)
    causal: bool = True  # CLIP's text tower is causal
    # "eot": last non-padding token | "first" | "last" (fixed last position: SigLIP) | "mean" |
    # "eos": first position of eos_token_id in the ids (CLIP in transformers) |
    # "argmax": position of the highest id (original CLIP: <|endoftext|> is the last id of its vocabulary)
    pool: str = "eot"
    eos_token_id: int | None = None  # for pool="eos"
    # How texts are padded for this encoder (models/inputs.tokenize): "longest" (pad to the longest text in
    # the batch, pads masked out) | "max_length" (pad every text to max_length and attend to the pads too,
    # as SigLIP was trained)
    padding: str = "longest"
    act: str = "gelu"
    norm_eps: float = 1e-5
    dropout: float = 0.0


TEXT_POOLS = ("eot", "first", "last", "mean", "eos", "argmax")
TEXT_PADDINGS = ("longest", "max_length")


class TextOutput(NamedTuple):
    tokens: torch.Tensor  # (B, T, C)
    pooled: torch.Tensor  # (B, C)


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.pool not in TEXT_POOLS:
            raise ValueError(f"unknown pool {config.pool!r}; expected one of {TEXT_POOLS}")
        if config.pool == "eos" and config.eos_token_id is None:
            raise ValueError("pool='eos' needs eos_token_id")
        if config.padding not in TEXT_PADDINGS:
            raise ValueError(f"unknown padding {config.padding!r}; expected one of {TEXT_PADDINGS}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position = nn.Parameter(torch.zeros(1, config.max_length, config.width))
        hidden = config.mlp_hidden or int(config.width * config.mlp_ratio)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.width, config.heads, hidden, act=config.act,
                             norm_eps=config.norm_eps, dropout=config.dropout)
            for _ in range(config.depth)
        )
        self.final_norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        init_weights(self)
        nn.init.normal_(self.position, std=0.01)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextOutput:
        """ids (B, T), attention_mask (B, T) with 1 on real tokens -> tokens (B, T, C), pooled (B, C)."""
        B, T = ids.shape
        if T > self.config.max_length:
            raise ValueError(f"text of {T} tokens is longer than the encoder's max_length {self.config.max_length}")
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        x = self.token_embedding(ids) + self.position[:, :T]
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask=keys, causal=self.config.causal)
        x = self.final_norm(x)
        if self.config.pool == "eot":  # the last real token, wherever the padding is
            last = (attention_mask.long() * torch.arange(T, device=ids.device)).argmax(dim=1)
            pooled = x[torch.arange(B, device=x.device), last]
        elif self.config.pool == "first":
            pooled = x[:, 0]
        elif self.config.pool == "last":
            pooled = x[:, -1]
        elif self.config.pool == "mean":
            weights = attention_mask.to(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:  # "eos": the first end-of-text id (position 0 if a row has none) | "argmax": the highest id
            marker = (ids == self.config.eos_token_id).int() if self.config.pool == "eos" else ids
            pooled = x[torch.arange(B, device=x.device), marker.argmax(dim=1)]
        return TextOutput(x, pooled)


@dataclass
class DecoderConfig:
    vocab_size: int = 1000
    max_length: int = 512
    width: int = 256
    depth: int = 4
    heads: int = 4
    kv_heads: int | None = None  # fewer key/value heads = grouped-query attention (None: same as heads)
    head_dim: int | None = None  # None: width // heads
    mlp_hidden: int | None = None  # None: 4 * width
    mlp: str = "gelu"  # "gelu" (GPT-2) | "gated" (SwiGLU: Llama, Qwen2)
    act: str = "gelu"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    position: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True  # the output layer reuses the token embedding matrix
    dropout: float = 0.0


class CausalDecoder(nn.Module):
    """A decoder-only language model; accepts token ids or ready-made input embeddings."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position = nn.Embedding(c.max_length, c.width) if c.position == "learned" else None
        head_dim = c.head_dim or c.width // c.heads
        self.rotary = RotaryEmbedding(head_dim, c.rope_theta) if c.position == "rope" else None
        self.blocks = nn.ModuleList(
            TransformerBlock(c.width, c.heads, c.mlp_hidden or 4 * c.width, norm=c.norm, norm_eps=c.norm_eps,
                             mlp=c.mlp, act=c.act, kv_heads=c.kv_heads, qkv_bias=c.qkv_bias, out_bias=c.out_bias,
                             mlp_bias=c.mlp_bias, dropout=c.dropout)
            for _ in range(c.depth)
        )
        for block in self.blocks:  # explicit head_dim (Qwen2 can differ from width // heads)
            if head_dim != c.width // c.heads:
                raise ValueError("head_dim other than width // heads is not supported yet")
        self.final_norm = make_norm(c.norm, c.width, c.norm_eps)
        self.lm_head = nn.Linear(c.width, c.vocab_size, bias=False)
        init_weights(self)
        if c.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)

    def new_cache(self, batch: int, max_length: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        weight = self.token_embedding.weight
        return KVCache(c.depth, batch, c.kv_heads or c.heads, c.head_dim or c.width // c.heads,
                       max_length or c.max_length, dtype or weight.dtype, weight.device)

    def new_batched_cache(self, dtype: torch.dtype | None = None) -> BatchedKVCache:
        """An empty decode batch (continuous batching: sequences join and leave it)."""
        c = self.config
        weight = self.token_embedding.weight
        return BatchedKVCache(c.depth, c.kv_heads or c.heads, c.head_dim or c.width // c.heads, c.max_length,
                              dtype or weight.dtype, weight.device)

    def forward(self, ids: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False,
                after_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                outputs_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for ids (B, T) or embeds (B, T, C).

        mask: None for plain causal attention, or a boolean (B, 1, T, S) mask that already
        contains causality, or for packed training rows a PackedAttention (everything then runs on
        the real positions only, as one sequence (1, N, C), and the logits come back as (B, T, V),
        zero on padding; ids / embeds and positions may then be given as (1, N) already).
        positions (B, T): position ids, by default 0..T-1 after whatever the cache holds.
        after_block(i, x): a step inserted after block i (the multimodal LM's image readers),
        returning the new x; it sees x as the blocks do, (1, N, C) for a packed batch.
        outputs_at (M,): only these positions' logits are wanted (training: where there is a next token
        to predict), as indices into the flattened (B * T) positions, or into the N real ones of a
        packed batch. The last block's output projection and MLP, the final norm and the head then run
        on those only, and the logits come back as (M, V); an after_block step after the last block
        sees (1, M, C).
        """
        x = self.embed(ids) if embeds is None else embeds
        packed = mask if isinstance(mask, PackedAttention) else None
        B, T = (packed.batch, packed.length) if packed is not None else x.shape[:2]
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        if packed is not None:  # everything runs on the real positions only, as one sequence (1, N)
            x, positions = (packed.compact(v) if v.shape[:2] == (B, T) else v for v in (x, positions))
        if int(positions.max()) >= self.config.max_length and self.position is not None:
            raise ValueError(f"sequence of {int(positions.max()) + 1} positions exceeds max_length {self.config.max_length}")
        if self.position is not None:
            x = x + self.position(positions)
        rotary = self.rotary(positions) if self.rotary is not None else None
        causal = mask is None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, causal=causal, rotary=rotary, cache=cache, layer=i,
                      keep=outputs_at if i == last else None)
            if after_block is not None:
                x = after_block(i, x)
        if cache is not None:
            cache.advance(T)
        if outputs_at is not None and not self.blocks:  # no last block to pick them
            x = rows(x.flatten(0, 1), outputs_at)[None]
        x = self.final_norm(x)
        x = x if return_hidden else self.lm_head(x)
        if outputs_at is not None:
            return x[0]
        return x if packed is None else packed.expand(x)
