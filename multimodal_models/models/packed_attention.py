"""Packed training rows without the work their mask throws away: attention block by block, and
the embedding, the decoder's per-token layers and its head on the real tokens only (the
multimodal LM's image readers read them as (B, T) rows again: their small products batch well
along T).

A packed row is a shared prefix (one image's tokens and the start of the chat) followed by
segments that each see the prefix and themselves, never each other, then padding up to the
batch's longest row (training/vlm_task.py). With a dozen segments in a row, the dense (T, T)
mask is about 94% False, and a sixth of the (B, T) positions are padding: dense attention
spends most of its time, forward and backward, on scores it throws away, and every linear
layer on padding.

`PackedAttention` keeps the N real positions of the batch, in order, as one long sequence
(`compact`; `expand` puts them back into (B, T) with zeros on padding), and cuts the mask
into blocks over them: the prefix's queries against the prefix's keys, each segment's queries
against the prefix's keys and its own. Blocks of similar length are batched together (one
batched matmul per length bucket), each with its piece of the dense mask, so each real
position gets the dense attention's result up to floating-point rounding.

Shapes: B batch, T length, N real positions, H heads, D head dim; G blocks in a bucket, Q / K
their longest query / key run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PREFIX, PADDING = 0, -1  # segment numbers with a meaning; 1, 2, ... are the packed segments


@dataclass
class _Bucket:
    """Blocks padded to one size: G blocks of Q query and K key slots."""

    blocks: int
    queries: int
    keys: int
    mask: torch.Tensor  # (G, Q, K) the dense mask's pieces; a padded query slot sees only its block's first key
    _biases: dict = field(default_factory=dict)

    def bias(self, heads: int) -> torch.Tensor:
        """The mask as an additive float32 bias (G * heads, Q, K), 0 or -inf, made once per number of heads."""
        if heads not in self._biases:
            bias = torch.zeros(self.mask.shape, device=self.mask.device).masked_fill(~self.mask, float("-inf"))
            self._biases[heads] = bias[:, None].expand(-1, heads, -1, -1).reshape(-1, *bias.shape[1:])
        return self._biases[heads]


@dataclass
class PackedAttention:
    """A packed batch's real positions and its attention mask as blocks; pass it to the decoder
    (TextDecoder) or to Attention as their `mask`."""

    batch: int
    length: int
    real: torch.Tensor  # (N,) the real positions b * T + t, in order
    buckets: list[_Bucket]
    queries: torch.Tensor  # every bucket's (G, Q) query slots, flattened one after the other: compact positions
    keys: torch.Tensor  # the same for the (G, K) key slots
    outputs: torch.Tensor  # (N,) the query slot that holds each compact position's output

    @classmethod
    def from_segments(cls, segments: torch.Tensor, mask: torch.Tensor, smallest_bucket: int = 16) -> PackedAttention:
        """segments (B, T): 0 on each row's shared prefix, 1, 2, ... on its segments (each one run of
        positions), -1 on padding; mask (B, 1, T, T) or (B, T, T): the dense mask, which may let a
        real position see only its own run and, for a segment, its row's prefix.

        Bucket sizes grow from smallest_bucket by half each time (16, 24, 36, ...): a block is
        padded to at most 1.5 times its length."""
        B, T = segments.shape
        segments = segments.cpu()
        flat = segments.flatten()
        real = (flat != PADDING).nonzero()[:, 0]
        compact = torch.full((B * T,), -1, dtype=torch.long)
        compact[real] = torch.arange(len(real))
        # the runs of one segment number in a row: where they start and end (flat positions b * T + t)
        starts = torch.ones(B, T, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        start = starts.flatten().nonzero()[:, 0]
        end = torch.cat([start[1:], torch.tensor([B * T])])
        kept = flat[start] != PADDING
        start, end = start[kept], end[kept]
        row, number, length = start // T, flat[start], end - start
        run_of = row * (int(flat.max()) + 2) + number + 1
        if len(run_of.unique()) < len(run_of):
            twice = next(i for i in range(len(run_of)) if (run_of[:i] == run_of[i]).any())
            raise ValueError(f"row {int(row[twice])}: segment {int(number[twice])} is not one run of positions")
        prefix_start, prefix_length = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
        prefix = number == PREFIX
        prefix_start[row[prefix]], prefix_length[row[prefix]] = start[prefix], length[prefix]
        shared = torch.where(number > PREFIX, prefix_length[row], 0)  # a segment's keys: its row's prefix, then its own
        size = torch.full_like(length, smallest_bucket)
        while (size < length).any():
            size = torch.where(size < length, size * 3 // 2, size)
        dense = mask.reshape(B * T, T).cpu()
        buckets, queries, keys, outputs, seen = [], [], [], torch.zeros(len(real), dtype=torch.long), 0
        slots = 0  # query slots of the buckets before this one
        for bucket_size in size.unique().tolist():
            chosen = size == bucket_size
            first, n, before = start[chosen, None], length[chosen, None], shared[chosen, None]
            Q, K = int(n.max()), int((before + n).max())
            slot = torch.arange(Q)
            real_queries = slot < n
            bucket_queries = first + torch.where(real_queries, slot, 0)  # padded slots repeat the first query
            slot = torch.arange(K)
            real_keys = slot < before + n
            bucket_keys = torch.where(slot < before, prefix_start[row[chosen], None] + slot, first + slot - before)
            bucket_keys = torch.where(real_keys, bucket_keys, bucket_keys[:, :1])  # and the first key
            piece = (dense[bucket_queries[:, :, None], (bucket_keys % T)[:, None, :]]
                     & real_queries[:, :, None] & real_keys[:, None, :])
            seen += int(piece.sum())
            piece[:, :, 0] |= ~real_queries  # a padded query slot sees one real key: no empty softmax
            kept = real_queries.flatten().nonzero()[:, 0]
            outputs[compact[bucket_queries.flatten()[kept]]] = slots + kept
            slots += real_queries.numel()
            buckets.append(_Bucket(len(first), Q, K, piece.to(mask.device)))
            queries.append(compact[bucket_queries.flatten()])
            keys.append(compact[bucket_keys.flatten()])
        if seen != int(dense[real].sum()):
            raise ValueError("the mask lets positions see beyond their segment and their row's prefix; "
                             "packed attention would drop that")
        empty = torch.zeros(0, dtype=torch.long)
        return cls(B, T, real.to(mask.device), buckets, torch.cat(queries or [empty]).to(mask.device),
                   torch.cat(keys or [empty]).to(mask.device), outputs.to(mask.device))

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, N, ...): the real positions, in order."""
        if x.shape[:2] != (self.batch, self.length):
            raise ValueError(f"packed batch of {self.batch} rows of {self.length} positions, given {tuple(x.shape[:2])}")
        return rows(x.flatten(0, 1), self.real)[None]

    def compact_index(self, flat: torch.Tensor) -> torch.Tensor:
        """Positions b * T + t (real ones) -> their indices in the compact sequence."""
        index = torch.searchsorted(self.real, flat)
        if len(flat) and (int(index.max()) >= len(self.real) or not torch.equal(self.real[index], flat)):
            raise ValueError("a position given is padding, not one of the packed batch's real positions")
        return index

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N, ...) -> (B, T, ...) with zeros on the padding."""
        full = x.new_zeros(self.batch * self.length, *x.shape[2:]).index_copy(0, self.real, x[0])
        return full.view(self.batch, self.length, *x.shape[2:])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (1, H, N, D) of the compact sequence -> (1, H, N, D): scaled dot-product attention
        under the dense mask."""
        _, H, N, D = q.shape
        if N != len(self.real):
            raise ValueError(f"packed attention over {len(self.real)} real positions, given {N}")
        # one gather per tensor for all buckets (its backward: one index_add_), split into the buckets
        by_position = [x[0].transpose(0, 1) for x in (q, k, v)]  # (N, H, D)
        split_q = rows(by_position[0], self.queries).split([b.blocks * b.queries for b in self.buckets])
        split_k, split_v = (rows(x, self.keys).split([b.blocks * b.keys for b in self.buckets]) for x in by_position[1:])
        outputs = []
        for bucket, qb, kb, vb in zip(self.buckets, split_q, split_k, split_v):
            qb, kb, vb = (x.view(bucket.blocks, -1, H, D).transpose(1, 2).reshape(bucket.blocks * H, -1, D)
                          for x in (qb, kb, vb))  # (G * H, Q or K, D)
            scores = torch.bmm(qb, kb.transpose(1, 2)).float() * D ** -0.5 + bucket.bias(H)
            # the softmax in float32 (in bfloat16 it is several times slower on CPU, forward and backward)
            y = torch.bmm(scores.softmax(-1).to(vb.dtype), vb)  # (G * H, Q, D)
            outputs.append(y.view(bucket.blocks, H, -1, D).transpose(1, 2).reshape(-1, H, D))  # (G * Q, H, D)
        return rows(torch.cat(outputs), self.outputs).transpose(0, 1)[None]


def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an index of any shape into x's first dimension. index_select, not x[index]:
    its backward adds rows up with index_add_, about ten times faster on CPU than x[index]'s."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])
