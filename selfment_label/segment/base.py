"""What every segmenter is: patch tokens of a batch in, soft patch masks per image out.

A segmenter takes ``[B, rows, cols, D]`` tokens of images that share one patch grid and
returns, for every image, a list of ``PatchMask`` (one per object). The pipeline turns them
into full-size masks (``selfment_label.masks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..timing import StageTimer

if TYPE_CHECKING:
    from ..features.backbone import Backbone

THRESHOLD = 0.5
"""A soft score above this is inside the mask: on the patch grid and at full size."""


@dataclass
class PatchMask:
    """One object on the patch grid.

    Arguments:
      scores: ``[rows, cols]`` soft foreground scores; the full-size mask is their bilinear
        upsampling thresholded at 0.5.
      score: the mask's confidence in [0, 1].
      extra: extra annotation keys (``level``, ``parent``) for hierarchical modes.
    """

    scores: torch.Tensor
    score: float
    extra: dict[str, Any] = field(default_factory=dict)


class ImageMasks(list):
    """One image's ``PatchMask`` list, with what the segmenter noted about the image.

    Arguments:
      masks: the image's patch masks.
      notes: JSON-able facts a reviewer should see, recorded in the journal and on the
        image's COCO entry (e.g. ``{"eigensolver": "stopped at its cap"}``); empty when
        nothing is worth noting.
    """

    def __init__(self, masks: list[PatchMask] = (), notes: dict[str, Any] | None = None):
        super().__init__(masks)
        self.notes = dict(notes or {})


class Segmenter(Protocol):
    """What the pipeline needs from a segmenter."""

    def options(self) -> dict[str, Any]:
        """The options that decide its results (recorded and compared on resume)."""
        ...

    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """Patch masks for each image of a ``[B, rows, cols, D]`` batch (an ``ImageMasks``
        per image when the segmenter has notes about it)."""
        ...


def segmenter_tokens(
    segmenter: Segmenter, backbone: Backbone, pixels: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """The tokens ``segmenter`` is called with: those its own ``tokens(backbone, pixels,
    dtype)`` asks for when it has that method (the single head: several blocks, the mirrored
    image too), else the backbone's last-layer patch tokens."""
    own = getattr(segmenter, "tokens", None)
    return own(backbone, pixels, dtype) if own else backbone.patch_tokens(pixels, dtype)
