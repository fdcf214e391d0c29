"""Grounding supervision of the Shapes image readers: where a question's heads should look.

The Shapes questions carry annotations that general data does not: for each description the
question makes, the centres of the objects it names ("referents"), and the objects the answer
rests on ("evidence"). `Grounding` turns them into targets for reader heads (which reader, which
head, which objects, and whether exactly those should beat the head's sink); `grounding_targets`
places them in a packed training batch; `grounding_loss` scores the readers' attention against
them. The VLM task of the Shapes world (tasks.py) adds it to the next-token loss.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F

from ..data.records import Points


@dataclass(frozen=True)
class Grounding:
    """Where a question looks (VQARecord.referents / evidence): object centres, image fractions."""

    referents: tuple[Points, ...]
    evidence: Points | None  # None: not annotated; (): the answer rests on no object
    counted: bool = False  # the answer is a number: how many objects the evidence holds

    def targets(self, readers: int, heads: int, *, exact: Collection[tuple[int, int]] = (),
                counted_evidence_only: bool = False) -> list[tuple[int, int, Points, bool]]:
        """(reader, head, points, exact) to supervise: the first reader's head i looks at what the
        question's i-th description names; with two or more readers, the last one's head 0 at the
        answer's evidence (found from the first look: the object closest to A) and its heads 1, 2, ...
        again at the descriptions' objects (with places and a sink, how much such a second look finds
        says where they are from a place, "is A below B?", or how many there are).

        Where a first-look (evidence) head is in `exact` as (reader, head) (heads that count), it is
        also to let exactly its objects beat the sink: a description that names nothing ("no cyan
        objects") is then a target too, with no objects. With `counted_evidence_only`, the evidence is
        exact only where the answer counts it (a yes/no answer's evidence, "A if it lies below B",
        then only says where to look). The second look is left free to use its sink for places."""
        out = []
        for head, group in enumerate(self.referents[:heads]):
            first = (0, head) in exact
            if group or first:
                out.append((0, head, group, first))
        if readers > 1:
            last = (readers - 1, 0) in exact and (self.counted or not counted_evidence_only)
            if self.evidence or (last and self.evidence is not None):
                out.append((readers - 1, 0, self.evidence, last))
            out += [(readers - 1, head, group, False) for head, group in enumerate(self.referents[:heads - 1], 1)
                    if group]
        return out

    @classmethod
    def of(cls, item, answer: str) -> Grounding | None:
        """The grounding of a VQARecord or a user Turn, whose answer is `answer`; None where it has none."""
        if not item.referents and item.evidence is None:
            return None
        return cls(item.referents, item.evidence, counted=answer.strip().isdigit())


@dataclass
class GroundingTargets:
    """Where some heads of some readers should look, for a batch.

    Entry g: at sequence `rows[g]`, position `positions[g]` (the position that predicts the answer),
    head `heads[g]` of reader `readers[g]` should put its attention on the image tokens nearest to
    the object centres points[g, :counts[g]] (fractions of the image side). Where exact[g] (for a
    reader with a sink), those tokens, and no other, should beat the head's sink: "how many" is then
    taught too, and an empty group says that nothing matches."""

    rows: torch.Tensor  # (G,) long
    positions: torch.Tensor  # (G,) long
    readers: torch.Tensor  # (G,) long
    heads: torch.Tensor  # (G,) long
    points: torch.Tensor  # (G, M, 2) float
    counts: torch.Tensor  # (G,) long
    exact: torch.Tensor | None = None  # (G,) bool; None: no entry is exact

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device) -> GroundingTargets:
        exact = None if self.exact is None else self.exact.to(device)
        return GroundingTargets(*(getattr(self, name).to(device) for name in
                                  ("rows", "positions", "readers", "heads", "points", "counts")), exact)


def grounding_loss(logits: list[torch.Tensor], centres: torch.Tensor, present: torch.Tensor,
                   targets: GroundingTargets, *, match_radius: float = 0.1) -> torch.Tensor | None:
    """Mean over targets of -log(attention mass on the target objects' tokens); plus, where targets
    are exact, the mean over them of the binary cross-entropy of each visible token's margin over
    the sink against whether it is a target (logits then come from readers with a sink).

    logits: each reader's (B, H, T, S); centres (B, S, 2) and present (B, S): where each image
    token's object is and whether there is one. Each target point takes the present token whose
    centre is nearest, if within `match_radius` (an object the vision side missed is skipped)."""
    if not len(targets):
        return None
    chosen = matched_tokens(targets.points, targets.counts, centres[targets.rows], present[targets.rows],
                            match_radius=match_radius)  # (G, S)
    rows = torch.stack(logits)[targets.readers, targets.rows, targets.heads, targets.positions].float()  # (G, S)
    terms = []
    keep = chosen.any(-1)
    if keep.any():
        log_probs = rows[keep].log_softmax(-1)
        terms.append(-log_probs.masked_fill(~chosen[keep], float("-inf")).logsumexp(-1).mean())
    if targets.exact is not None and targets.exact.any():
        margins, wanted = rows[targets.exact], chosen[targets.exact]
        seen = margins.isfinite()  # the tokens each position can see
        per_token = F.binary_cross_entropy_with_logits(margins[seen], wanted[seen].float(), reduction="none")
        per_target = torch.zeros_like(margins).masked_scatter(seen, per_token).sum(-1) / seen.sum(-1).clamp(min=1)
        terms.append(per_target.mean())
    return sum(terms) if terms else None


def matched_tokens(points: torch.Tensor, counts: torch.Tensor, centres: torch.Tensor, present: torch.Tensor, *,
                   match_radius: float = 0.1) -> torch.Tensor:
    """Which image tokens stand for the objects at `points` (G, M, 2), of which the first counts[g]
    are real: for each point, the present token (present (G, S)) whose centre (centres (G, S, 2))
    is nearest, if within match_radius. Returns (G, S) bool."""
    M = points.shape[1]
    distance = (points[:, :, None, :] - centres[:, None, :, :]).norm(dim=-1)  # (G, M, S)
    distance = distance.masked_fill(~present[:, None, :], float("inf"))
    nearest = distance.min(-1)
    valid = (torch.arange(M, device=distance.device)[None] < counts[:, None]) & (nearest.values <= match_radius)
    return (F.one_hot(nearest.indices, distance.shape[-1]).bool() & valid[..., None]).any(1)


def padded_points(groups: Sequence[Sequence[tuple[float, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of object centres as one (G, M, 2) tensor, zero-padded, and each group's size (G,);
    a group may be empty (an exact target that names no object)."""
    counts = torch.tensor([len(g) for g in groups], dtype=torch.long)
    points = torch.zeros(len(groups), max([1, *counts.tolist()]), 2)
    flat = torch.tensor(list(chain.from_iterable(groups)), dtype=torch.float32)  # one tensor, not one per group
    points[torch.arange(points.shape[1]) < counts[:, None]] = flat.reshape(-1, 2)
    return points, counts


def grounding_targets(rows: list, readers: int, heads: int, *, exact_heads: Collection[tuple[int, int]] = frozenset(),
                      counted_evidence_only: bool = False, exact: bool = False) -> GroundingTargets:
    """Each grounded answer's targets at the position that predicts its first token. rows: the packed rows
    of a batch (training.vlm_task.pack), whose answers' annotations are Groundings (or None); exact_heads:
    the (reader, head) pairs that count (taught exactly where `exact`)."""
    where: list[tuple[int, int, int, int, int]] = []  # (row, position, reader, head, exact)
    groups: list[Points] = []
    for row, (_, row_targets, _, _, placed) in enumerate(rows):
        for start, end, answers in placed:
            # each assistant turn is a run of trained tokens; its first is predicted one position earlier
            firsts = [t for t in range(start, end) if row_targets[t] and not row_targets[t - 1]]
            for first, grounding in zip(firsts, answers):
                targets = () if grounding is None else grounding.targets(
                    readers, heads, exact=exact_heads, counted_evidence_only=counted_evidence_only)
                for reader, head, points, is_exact in targets:
                    where.append((row, first - 1, reader, head, is_exact))
                    groups.append(points)
    columns = torch.tensor(where, dtype=torch.long).reshape(-1, 5).T
    return GroundingTargets(*columns[:4], *padded_points(groups), columns[4].bool() if exact else None)
