"""Patch scores -> full-size masks: logit-space bilinear upsampling, edge refinement, tree layout,
and each mask's COCO annotation record (compressed RLE, area, bbox, score).

Segmenters return soft patch masks with an optional ``parent`` (index of the enclosing mask
among the same image's masks). Siblings (masks with the same parent, top-level masks
included) are upsampled together as label layers: a background layer ``1 - max`` of their
scores, then one layer per sibling; an edge refinement (``selfment_label.refine``) may then
filter the layers guided by the image, and every pixel goes to its highest layer. Without
refinement that is exactly "above 0.5 and the highest sibling". At full size the layout rules
are:

- siblings never overlap: a pixel that several of them claim goes to the one with the
  highest (refined) soft score;
- a child lies inside its parent (it is clipped to it);
- masks left empty are dropped, and the ``parent`` indices of the remaining masks are renumbered
  so they still point at the right mask (children of a dropped mask are empty by clipping, so
  they are dropped too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from .refine import guide_tensor, refine_layers
from .segment.base import THRESHOLD as THRESHOLD  # a full-size mask is scores > THRESHOLD
from .segment.base import PatchMask

LOGIT_EPS = 1e-6


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample patch-grid scores to full image size, bilinearly in logit space.

    The scores are probabilities (a sigmoid or softmax of a margin), so their logits are
    interpolated and mapped back through the sigmoid: the 0.5 boundary then falls where the
    interpolated margin crosses zero, between patch centres, instead of being snapped to the
    patch grid by a saturated sigmoid (+0.019 IoU, +0.019 maxF on ecssd-dev; see "What was
    tried" in docs/quality-report.md).
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


def highest_layer(layers: torch.Tensor) -> torch.Tensor:
    """Index of each pixel's highest layer, the first one on ties: ``layers.argmax(0)``.

    One elementwise pass per layer: torch's ``argmax`` over the leading dimension of
    ``[L, H, W]`` full-size maps reduces across strided memory and cost about 10 ms per
    ecssd-dev image on the development CPU, most of the masks stage (benchmarks/NOTES.md).

    Arguments:
      layers: ``[L, H, W]`` scores.

    Returns:
      ``[H, W]`` int32 indices in ``[0, L)``.
    """
    owner = torch.zeros(layers.shape[1:], dtype=torch.int32, device=layers.device)
    best = layers[0]
    for index in range(1, layers.shape[0]):
        higher = layers[index] > best
        owner.masked_fill_(higher, index)
        best = torch.maximum(best, layers[index])
    return owner


def _parent(patch_mask: PatchMask) -> int | None:
    parent = patch_mask.extra.get("parent")
    return None if parent is None else int(parent)


def full_size_masks(
    patch_masks: list[PatchMask],
    width: int,
    height: int,
    refine: str = "none",
    guide: np.ndarray | None = None,
) -> tuple[list[FullSizeMask], torch.Tensor | None]:
    """Upsample one image's patch masks, refine their edges and enforce the layout rules.

    Arguments:
      patch_masks: the segmenter's masks for one image; a ``parent`` must point at an
        earlier mask.
      width, height: the image's displayed size.
      refine: edge refinement (``none``, ``guided``, ``crf``; see ``selfment_label.refine``).
      guide: ``[h, w, 3]`` uint8 RGB image the refinement follows (the displayed image,
        possibly shrunk); required unless ``refine`` is ``none``. The maps are refined at
        its size and then upsampled to ``(height, width)``.

    Returns:
      ``(kept masks in input order, soft union [H, W] of the (refined) scores or None)``.
    """
    parents = [_parent(p) for p in patch_masks]
    for index, parent in enumerate(parents):
        if parent is not None and not 0 <= parent < index:
            raise ValueError(f"mask {index} has parent {parent}: parents must come first")
    if refine != "none" and guide is None:
        raise ValueError(f"refine {refine!r} needs the guide image")
    masks: list[np.ndarray | None] = [None] * len(patch_masks)
    union: torch.Tensor | None = None
    for parent in dict.fromkeys(parents):
        members = [i for i, p in enumerate(parents) if p == parent]
        layers = _sibling_layers(
            [patch_masks[i].scores for i in members], width, height, refine, guide
        )
        top = layers[1:].max(0).values
        union = top if union is None else torch.maximum(union, top)
        owner = highest_layer(layers)
        for slot, index in enumerate(members):
            mask = (owner == slot + 1).cpu().numpy()
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


def _sibling_layers(
    scores: list[torch.Tensor],
    width: int,
    height: int,
    refine: str,
    guide: np.ndarray | None,
) -> torch.Tensor:
    """``[1 + K, height, width]`` label layers of K siblings: background, then each sibling."""
    grid = torch.stack([s.float() for s in scores])
    size = (height, width) if guide is None or refine == "none" else guide.shape[:2]
    soft = upsample_scores(grid, size)
    layers = torch.cat([1.0 - soft.max(0, keepdim=True).values, soft])
    if refine == "none":
        return layers
    patch_pixels = (size[0] / grid.shape[-2] + size[1] / grid.shape[-1]) / 2
    layers = refine_layers(layers, guide_tensor(guide, layers.device), refine, patch_pixels)
    if size != (height, width):
        layers = upsample_scores(layers, (height, width))
    return layers


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE of a boolean ``[H, W]`` mask, with ``counts`` as str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def annotation_record(
    mask: np.ndarray, score: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The per-image annotation record (before ids) for one boolean mask.

    ``area`` and ``bbox`` come from pycocotools on the encoded RLE, as COCO tools compute them.
    """
    rle = encode_rle(mask)
    binary = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    record = {
        "segmentation": rle,
        "area": int(mask_utils.area(binary)),
        "bbox": [float(v) for v in mask_utils.toBbox(binary)],
        "score": round(float(score), 6),
    }
    if extra:
        record.update(extra)
    return record
