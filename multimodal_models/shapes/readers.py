"""A cross-attention from the decoder's text positions back to an image's own tokens.

The native multimodal LM sees an image as projected embeddings inside its sequence, and what
the projector hands over fades through the decoder blocks (on Shapes a linear probe finds an
object's height with R^2 0.75 after the first block, 0.08 after the sixth). An `ImageReader`
after a decoder block lets every text position look again at the image tokens as the vision
side wrote them (before the projector, e.g. each object slot's centre and attribute readings),
as the cross-attention layers of Flamingo and Llama 3.2 Vision do, added to the residual.

Its attention can be supervised (grounding.py, `grounding_loss`): where a question's annotations say which
objects it names, one head per description is trained to look at them. Without that, a
comparison of two objects ("is A left of B?") does not start within our budgets: attention
averages what it reads, and nothing pulls one head toward A and another toward B.

With `sink`, each head may also look at nothing: a learned logit per head (from the reading
position) competes with the image tokens and reads a zero vector. Plain softmax attention reads
the same mean from one red object as from three, so it cannot count; with a sink the share left on
the objects grows with how many match, and "none matches" reads zero. That share saturates (1/2,
2/3, 3/4 ... for one, two, three equal tokens); with `counts` (every head, or the heads it names)
a head also hands on a count: the sum over the tokens of sigmoid(token logit - sink logit), the
number of tokens that beat the sink, which grows by one with each object that matches. With
`sink_share` off, a counting head's sink sets only that count, and what the head reads is weighed
over the tokens alone, as without a sink: a read of one object then hands on its centre unscaled,
however far the object beats the sink (a place named from it is where the object is); the heads
that do not count keep the sink's share. Training can say outright which tokens should beat a
head's sink (`GroundingTargets.exact`): then the count is taught, not only found.

With `places`, where the image tokens are objects with known centres, each head also names, from
its reading position, a place p, a signed sharpness s and a direction d, and adds
-s * |c - p|^2 / PLACE_UNIT^2 + d . (c - p) / PLACE_UNIT to its logit for the token centred at c.
"The object closest to A" (s > 0, p at A) and "furthest from A" (s < 0) become one attention, and
with a sink, so does "is A below B?" (p at B, d downwards: the share left on A says whether it
is). A q.k over the centres' sines and cosines only approximates a distance, and turning it
around for "furthest" or "above" takes a product of the question's word and a place, which the
decoder's layers learn slowly; here that product is the attention's own.

With `relations` (a reader after another), each head also measures every object against what the
earlier reader's heads looked at from the same position (their attention over the objects, from
which the centre and attributes each read follow exactly): its place may be one that an
earlier head read (a learned mixture of their read centres, plus an offset), and it may prefer, or
avoid, objects that share an attribute with what an earlier head read (colour, shape, ... each
weighed on its own), the very objects an earlier head looked at, and those objects by how far the
centre it read lies in a direction from the centre another earlier head read. "Closest to A" then
names A's read centre as its place, exactly, where a place written through the residual stream
comes back scaled by its layer norm; "is A below B?" lifts A's token by how far A was read to lie
below B; "is A the same colour as B?" prefers objects of A's read colour, and "how many other
objects have A's shape?" counts those of A's shape that are not A. Each weight comes from the
reading position, as a place does; all are zero at first, so an untrained reader with relations
reads as one without.

With `separations` too, the relating reader also hands on, into the residual, where the centre each
earlier head read lies from the centre each other one read (in tenths of the image side), through
weights zero at first, as a count is handed on: "is A above or below B?" and "is A below B?" become
a readout of one number and the question's word, which the decoder's later layers learn from the
answer's own loss (the direction term above learns only through the evidence head's targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


PLACE_UNIT = 0.1  # distances to a named place are measured in tenths of the image side
RELATION_UNIT = 0.1  # a relation weight of 1 moves a logit by 10 where an object fully agrees


class ReaderOutput(NamedTuple):
    x: torch.Tensor  # (B, T, C) the updated residual
    logits: torch.Tensor  # (B, H, T, S) attention logits over the image tokens (margins over the sink with one)
    # (B, H, T, S) each head's attention over the image tokens alone (the sink left out; 0 where none is
    # visible): where it looked, for a later reader with relations to measure objects against
    looked: torch.Tensor


class ImageReader(nn.Module):
    """x (B, T, C) + out(softmax(q(x) k(ctx)^T) v(ctx)): text positions read the image tokens."""

    def __init__(self, width: int, context_width: int, heads: int, head_dim: int, *, sink: bool = False,
                 counts: bool | Sequence[int] = False, sink_share: bool = True, places: bool = False,
                 relations: int = 0, attribute_sizes: Sequence[int] = (), separations: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(context_width)
        self.q = nn.Linear(width, heads * head_dim)
        self.k = nn.Linear(context_width, heads * head_dim)
        self.v = nn.Linear(context_width, heads * head_dim)
        self.out = nn.Linear(heads * head_dim, width)
        if counts and not sink:
            raise ValueError("an image reader counts the tokens that beat its sink: counts needs sink")
        if not sink_share and not counts:
            raise ValueError("sink_share=False leaves a counting head's sink only its count: it needs counts")
        self.sink = nn.Linear(width, heads) if sink else None  # each head's logit for reading nothing
        self.sink_share = sink_share
        # the heads that hand on a count: counts True is every head, a sequence names them
        self.counting_heads = tuple(range(heads)) if counts is True else tuple(counts or ())
        if any(not 0 <= h < heads for h in self.counting_heads) or len(set(self.counting_heads)) < len(self.counting_heads):
            raise ValueError(f"counting heads {list(self.counting_heads)} must be distinct heads of 0..{heads - 1}")
        # the heads whose sink takes no share of the read (sink_share False: the counting heads)
        kept_out = torch.zeros(heads, dtype=torch.bool)
        if not sink_share:
            kept_out[list(self.counting_heads)] = True
        self.register_buffer("sink_kept_out", kept_out, persistent=False)
        self.count = None
        if self.counting_heads:  # how many tokens beat each head's sink, into x; zero at first (six would swamp x)
            self.count = nn.Linear(len(self.counting_heads), width, bias=False)
            nn.init.zeros_(self.count.weight)
        self.place = None
        if places:  # each head's place (x, y), sharpness and direction (x, y); zero at first: no change until trained
            self.place = nn.Linear(width, heads * 5)
            nn.init.zeros_(self.place.weight)
            nn.init.zeros_(self.place.bias)
        # relations: how many heads the earlier reader has; attribute_sizes: each attribute's number of values
        self.relations, self.attribute_sizes = relations, tuple(attribute_sizes)
        self.relate = None
        if relations:
            if not places:
                raise ValueError("an image reader's relations name places that earlier heads read: relations needs places")
            # per head and earlier head: its read centre's share of the place, same-object weight, one weight per
            # attribute, and for each earlier head a direction (x, y) in which what it found should lie from that one's
            self.relate = nn.Linear(width, heads * relations * (2 + len(self.attribute_sizes) + 2 * relations))
            nn.init.zeros_(self.relate.weight)
            nn.init.zeros_(self.relate.bias)
        if relations and self.attribute_sizes:
            groups = torch.repeat_interleave(torch.arange(len(self.attribute_sizes)), torch.tensor(self.attribute_sizes,
                                                                                                  dtype=torch.long))
            self.register_buffer("attribute_groups", F.one_hot(groups, len(self.attribute_sizes)).float(),
                                 persistent=False)  # (A, attributes): which attribute each value belongs to
        self.separation = None
        if separations:
            if not relations:
                raise ValueError("an image reader's separations lie between what earlier heads read: separations "
                                 "needs relations")
            # where what each earlier head read lies from what each other one read (x, y), into x; zero at first
            self.separation = nn.Linear(relations * relations * 2, width, bias=False)
            nn.init.zeros_(self.separation.weight)

    def forward(self, x: torch.Tensor, context: torch.Tensor, visible: torch.Tensor,
                places: torch.Tensor | None = None, attributes: torch.Tensor | None = None,
                earlier: torch.Tensor | None = None) -> ReaderOutput:
        """x (B, T, C); context (B, S, C_ctx); visible (B, T, S) bool: which image tokens each
        position may read (those of images placed before it); places (B, S, 2): each token's centre
        (fractions of the image side), for a reader built with places; attributes (B, S, A): each
        token's attribute probabilities side by side, and earlier, where the earlier reader's heads looked
        (its `looked`), for a reader built with relations. Returns the updated x, the attention logits
        over the image tokens (B, H, T, S), -inf where not visible, and where each head looked. With a sink the logits
        are each token's margin over it (token logit - sink logit): the softmax over the tokens alone,
        which grounding trains, is the same, and a margin above zero is a token the head counts."""
        B, T, _ = x.shape
        S = context.shape[1]
        context = self.context_norm(context)
        normed = self.norm(x)
        q = self.q(normed).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(context).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / self.head_dim**0.5  # (B, H, T, S)
        separations = None
        if self.place is not None:
            if places is None:
                raise ValueError("this image reader measures distances to places: pass each image token's centre")
            named = self.place(normed).view(B, T, self.heads, 5).transpose(1, 2)  # (B, H, T, 5)
            place = named[..., :2]
            if self.relate is not None:
                place, related, separations = self._relations(normed, places, attributes, earlier, place)
                logits = logits + related
            offset = (places[:, None, None, :, :] - place[..., None, :]) / PLACE_UNIT  # (B, H, T, S, 2)
            # - s |offset|^2 + d . offset, summed elementwise (a matmul per token would be 2 x 1)
            logits = logits + (offset * (named[..., None, 3:] - named[..., None, 2:3] * offset)).sum(-1)
        logits = logits.masked_fill(~visible[:, None], float("-inf"))
        looked = torch.nan_to_num(logits.float().softmax(-1), nan=0.0)  # over the tokens alone; none visible: nothing
        sink = self.sink(normed).transpose(1, 2)[..., None] if self.sink is not None else None  # (B, H, T, 1)
        if sink is None:
            weights = looked.to(v.dtype)
        elif self.sink_share:  # the sink reads a zero vector: only the tokens' share is kept
            weights = torch.cat([logits, sink], dim=-1).float().softmax(-1)[..., :S].to(v.dtype)
        else:  # the counting heads' sinks take no share (their weights are over the tokens alone), the others' do
            kept_out = sink.masked_fill(self.sink_kept_out[:, None, None], float("-inf"))
            weights = torch.nan_to_num(torch.cat([logits, kept_out], dim=-1).float().softmax(-1)[..., :S], nan=0.0)
            weights = weights.to(v.dtype)
        counted = None
        if sink is not None:
            logits = logits - sink  # a token not visible stays at -inf and counts sigmoid(-inf) = 0
            if self.count is not None:
                every = self.counting_heads == tuple(range(self.heads))
                counting = logits if every else logits[:, list(self.counting_heads)]
                counted = torch.sigmoid(counting).sum(-1).transpose(1, 2)  # (B, T, counting heads)
        read = self.out((weights @ v).transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
        if counted is not None:
            read = read + self.count(counted.to(read.dtype))
        if self.separation is not None:
            read = read + self.separation(separations.flatten(2).to(read.dtype))
        return ReaderOutput(x + read, logits, looked)

    def _relations(self, normed: torch.Tensor, places: torch.Tensor, attributes: torch.Tensor | None,
                   earlier: torch.Tensor | None, offset: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each head's place (B, H, T, 2): a mixture of the earlier heads' read centres plus `offset`;
        what the relations add to its logits (B, H, T, S): same-object and shared-attribute preferences, and
        on the objects an earlier head looked at, how far the centre it read lies in a direction from the
        centre another earlier head read; and those separations themselves (B, T, P, Q, 2): where the
        centre head p read lies from the one head q read, in PLACE_UNITs.

        The last answers "is A below B?" on A alone: a direction term on every token (`places`) also lifts
        whatever else lies below B, which an exact target (A beats the sink if it lies below B, nothing else
        does) then pushes down, so its gradient cancels; here only the objects the head that found A
        looked at move, by where A was read to lie from B. It is measured between two read centres, not
        from the place: a place learned for "closest to A" sits on A, from where A lies nowhere, and
        "is A below B?" would get no gradient toward B."""
        if earlier is None:
            raise ValueError("this image reader measures objects against what an earlier reader found: pass "
                             "where its heads looked")
        if self.attribute_sizes and attributes is None:
            raise ValueError("this image reader compares attributes: pass each image token's attribute probabilities")
        B, T, _ = normed.shape
        P, G = self.relations, len(self.attribute_sizes)
        if earlier.shape[1] != P:
            raise ValueError(f"this image reader relates to {P} earlier heads, but {earlier.shape[1]} looked")
        read_centres = earlier @ places.float()[:, None]  # (B, P, T, 2): the centre each earlier head read
        weights = self.relate(normed).float().view(B, T, self.heads, P, 2 + G + 2 * P).permute(0, 2, 1, 3, 4)
        share = weights[..., 0].softmax(-1)  # (B, H, T, P): whose read centre is the place
        place = offset.float() + torch.einsum("bhtp,bptc->bhtc", share, read_centres)
        related = torch.einsum("bhtp,bpts->bhts", weights[..., 1], earlier)  # on the objects they looked at
        if G:
            read_attributes = earlier @ attributes.float()[:, None]  # (B, P, T, A): what each earlier head read
            # agreement of each token's attributes with each earlier head's read ones, per attribute (B, P, T, S, G)
            agree = (read_attributes[:, :, :, None, :] * attributes.float()[:, None, None]) @ self.attribute_groups
            related = related + torch.einsum("bhtpg,bptsg->bhts", weights[..., 2:2 + G], agree)
        read = read_centres.transpose(1, 2)  # (B, T, P, 2)
        lies = (read[:, :, :, None] - read[:, :, None]) / PLACE_UNIT  # (B, T, P, Q, 2): what p found, from what q found
        directions = weights[..., 2 + G:].unflatten(-1, (P, 2))  # (B, H, T, P, Q, 2)
        toward = (directions * lies[:, None]).sum((-1, -2))  # (B, H, T, P): along the directions named
        return place, related / RELATION_UNIT + torch.einsum("bhtp,bpts->bhts", toward, earlier), lies
