"""Patch scores -> full-size masks: logit-space bilinear upsampling, threshold, tree layout.

Segmenters return soft patch masks with an optional ``parent`` (index of the enclosing mask
among the same image's masks). At full size the layout rules are:

- siblings (masks with the same parent, top-level masks included) never overlap: a pixel that
  several of them claim goes to the one with the highest soft score;
- a child lies inside its parent (it is clipped to it);
- masks left empty are dropped, and the ``parent`` indices of the remaining masks are renumbered
  so they still point at the right mask (children of a dropped mask are empty by clipping, so
  they are dropped too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .segment.base import PatchMask

THRESHOLD = 0.5
LOGIT_EPS = 1e-6


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample patch-grid scores to full image size, bilinearly in logit space.

    The scores are probabilities (a sigmoid or softmax of a margin), so their logits are
    interpolated and mapped back through the sigmoid: the 0.5 boundary then falls where the
    interpolated margin crosses zero, between patch centres, instead of being snapped to the
    patch grid by a saturated sigmoid (+0.019 IoU, +0.019 maxF on ecssd-dev; README, Quality).
    Hard 0/1 scores come out as a sharp step half way between patch centres.

    Arguments:
      scores: ``[rows, cols]`` or ``[B, rows, cols]`` soft scores in [0, 1].
      size: ``(height, width)`` of the output.

    Returns:
      Scores in [0, 1] at ``size`` with the input's leading shape, on the input's device.
    """
    squeeze = scores.dim() == 2
    grid = scores[None, None] if squeeze else scores[:, None]
    logits = torch.logit(grid.float(), eps=LOGIT_EPS)
    up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    up = torch.sigmoid(up[:, 0])
    return up[0] if squeeze else up


@dataclass
class FullSizeMask:
    """One kept mask at full size.

    Arguments:
      mask: ``[H, W]`` boolean mask.
      score: confidence in [0, 1].
      extra: annotation keys (``level``; ``parent`` renumbered among the kept masks).
    """

    mask: np.ndarray
    score: float
    extra: dict


def _parent(patch_mask: PatchMask) -> int | None:
    parent = patch_mask.extra.get("parent")
    return None if parent is None else int(parent)


def full_size_masks(
    patch_masks: list[PatchMask], width: int, height: int
) -> tuple[list[FullSizeMask], torch.Tensor | None]:
    """Upsample one image's patch masks and enforce the layout rules.

    Arguments:
      patch_masks: the segmenter's masks for one image; a ``parent`` must point at an
        earlier mask.
      width, height: the image's displayed size.

    Returns:
      ``(kept masks in input order, soft union [H, W] of all scores or None)``.
    """
    parents = [_parent(p) for p in patch_masks]
    for index, parent in enumerate(parents):
        if parent is not None and not 0 <= parent < index:
            raise ValueError(f"mask {index} has parent {parent}: parents must come first")
    masks: list[np.ndarray | None] = [None] * len(patch_masks)
    union: torch.Tensor | None = None
    for parent in dict.fromkeys(parents):
        members = [i for i, p in enumerate(parents) if p == parent]
        soft = upsample_scores(
            torch.stack([patch_masks[i].scores.float() for i in members]),
            (height, width),
        )
        top = soft.max(0).values
        union = top if union is None else torch.maximum(union, top)
        owner = soft.argmax(0)
        for slot, index in enumerate(members):
            mask = ((soft[slot] > THRESHOLD) & (owner == slot)).cpu().numpy()
            if parent is not None:
                mask &= masks[parent]
            masks[index] = mask
    kept: list[FullSizeMask] = []
    new_index: dict[int, int] = {}
    for index, (patch_mask, mask) in enumerate(zip(patch_masks, masks, strict=True)):
        if not mask.any():
            continue
        extra = dict(patch_mask.extra)
        if parents[index] is not None:
            extra["parent"] = new_index[parents[index]]
        new_index[index] = len(kept)
        kept.append(FullSizeMask(mask=mask, score=patch_mask.score, extra=extra))
    return kept, union
