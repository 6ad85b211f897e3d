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
    """What the pipeline needs from a segmenter.

    A segmenter that also uses the images' class tokens says so with a class attribute
    ``takes_class_tokens = True`` and takes them as a third argument; one that depends on
    which images it segments says ``takes_file_names = True`` and takes the batch's file
    names as the keyword ``names`` (``segment_batch``).
    """

    def options(self) -> dict[str, Any]:
        """The options that decide its results (recorded and compared on resume)."""
        ...

    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """Patch masks for each image of a ``[B, rows, cols, D]`` batch (an ``ImageMasks``
        per image when the segmenter has notes about it)."""
        ...


BatchTokens = tuple[torch.Tensor, torch.Tensor | None]
"""A batch's ``[B, rows, cols, D]`` patch tokens and ``[B, D]`` class tokens (or ``None``)."""


def segmenter_tokens(
    segmenter: Segmenter, backbone: Backbone, pixels: torch.Tensor, dtype: torch.dtype | None
) -> BatchTokens:
    """The tokens ``segmenter`` is called with, and the ``[B, D]`` class tokens (None when the
    segmenter asks for its own): those its own ``tokens(backbone, pixels, dtype)`` asks for
    when it has that method (the single head: several blocks, the mirrored image too), else
    the backbone's last-layer patch tokens and class tokens of one pass."""
    own = getattr(segmenter, "tokens", None)
    if own:
        return own(backbone, pixels, dtype), None
    return backbone.patch_and_class_tokens(pixels, dtype)


def segment_batch(
    segmenter: Segmenter,
    tokens: torch.Tensor,
    timer: StageTimer,
    class_tokens: torch.Tensor | None,
    names: list[str] | None = None,
) -> list[list[PatchMask]]:
    """Run ``segmenter`` on a batch, with the ``[B, D]`` class tokens when it takes them and
    the images' file names when it takes them."""
    if names is not None and getattr(segmenter, "takes_file_names", False):
        return segmenter(tokens, timer, names=names)
    if class_tokens is not None and getattr(segmenter, "takes_class_tokens", False):
        return segmenter(tokens, timer, class_tokens)
    return segmenter(tokens, timer)
