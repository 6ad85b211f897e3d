"""From patch scores to full-size masks: bilinear upsampling, threshold, box, area, score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

THRESHOLD = 0.5


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample patch-grid scores to full image size.

    Arguments:
      scores: ``[rows, cols]`` or ``[B, rows, cols]`` soft scores in [0, 1].
      size: ``(height, width)`` of the output.

    Returns:
      Scores at ``size`` with the input's leading shape, on the input's device.
    """
    squeeze = scores.dim() == 2
    grid = scores[None] if squeeze else scores
    up = torch.nn.functional.interpolate(
        grid[:, None].float(), size=size, mode="bilinear", align_corners=False
    )[:, 0]
    return up[0] if squeeze else up


def box_xywh(mask: np.ndarray) -> list[float]:
    """Tight COCO box ``[x, y, w, h]`` of a boolean mask (zeros when the mask is empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def confidence_score(patch_probability: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mask score in [0, 1]: how cleanly the patches separate into object and background.

    The mean, over all patches, of the prototype probability of the side each patch was
    given (``p`` inside the mask, ``1 - p`` outside). 1 means every patch is decisively
    closer to its own side's mean feature than to the other's; 0.5 means the split is
    arbitrary in feature space.

    Arguments:
      patch_probability: ``[..., N]`` prototype foreground probabilities.
      labels: ``[..., N]`` boolean patch labels of the mask.

    Returns:
      ``[...]`` scores.
    """
    agree = torch.where(labels, patch_probability, 1.0 - patch_probability)
    return agree.mean(-1)


@dataclass
class MaskRecord:
    """One full-size mask and its COCO fields.

    Arguments:
      mask: ``[H, W]`` boolean mask at the image's displayed size.
      score: confidence in [0, 1].
      extra: extra annotation keys (``level``, ``parent``) for hierarchical modes.
    """

    mask: np.ndarray
    score: float
    extra: dict | None = None

    @property
    def area(self) -> int:
        """Mask pixels."""
        return int(self.mask.sum())

    @property
    def bbox(self) -> list[float]:
        """COCO ``[x, y, w, h]`` from the mask."""
        return box_xywh(self.mask)
