"""Grounded caption accuracy for the Shapes benchmark.

Word-overlap metrics cannot tell a fluent wrong caption from a right one. On Shapes the
scene graph is known, so each caption is parsed into the claims it makes (see
`multimodal_models.data.shapes.grounding`) and every claim is checked:

- claim precision: true claims / all claims, over all captions (percent);
- hallucination rate: share of captions that mention at least one object that is not in
  the scene (CHAIR_s, percent);
- object hallucination rate: share of object mentions that match nothing (CHAIR_i, percent).
"""

from __future__ import annotations

from collections import defaultdict

from ...data.shapes.grounding import check_caption


def grounding_scores(predictions: dict, scenes: dict, *, precision: int = 2) -> dict:
    """predictions {image_id: caption}; scenes {image_id: Scene}."""
    unknown = [i for i in predictions if i not in scenes]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image ids have no scene graph, e.g. {unknown[:5]}")
    claims_by_kind: dict[str, list[bool]] = defaultdict(list)
    hallucinating_captions = mentions = hallucinated_mentions = without_claims = 0
    for image_id, caption in predictions.items():
        check = check_caption(caption, scenes[image_id])
        for claim in check.claims:
            claims_by_kind[claim.kind].append(claim.holds)
        mentions += check.mentions
        hallucinated_mentions += len(check.hallucinated)
        hallucinating_captions += bool(check.hallucinated)
        without_claims += not check.claims
    all_claims = [h for hs in claims_by_kind.values() for h in hs]

    def pct(numerator: float, denominator: float) -> float | None:
        return round(100 * numerator / denominator, precision) if denominator else None

    return {
        "claim_precision": pct(sum(all_claims), len(all_claims)),
        "hallucination_rate": pct(hallucinating_captions, len(predictions)),
        "object_hallucination_rate": pct(hallucinated_mentions, mentions),
        "perClaimType": {k: {"precision": pct(sum(v), len(v)), "num": len(v)} for k, v in sorted(claims_by_kind.items())},
        "num_captions": len(predictions),
        "num_claims": len(all_claims),
        "captions_without_claims": without_claims,
    }

