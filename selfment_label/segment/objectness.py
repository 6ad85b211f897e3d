"""Does an image hold a distinct object at all? Two tests on its patches and their split.

A Normalized Cut always returns a split, even when there is nothing to split. Two kinds of
images have no distinct object, and each is recognised by its own test:

- *Alike*: every pair of patches is alike (solid colour, gradient, sky, a wall, noise, a
  fine texture). The smallest pairwise cosine of the patch tokens is well above the graph's
  ``tau``, so the affinity is all ones, the second eigenvector is arbitrary and the cut is
  the solver's random start. On ecssd-dev (DINOv2 ViT-S/14) the smallest cosine is at most
  0.145 on the 200 real images (448 px) and at least 0.38 on the 56 synthetic object-less
  images (solid, gradient, noise, checkerboard, blurred texture, sky; four sizes) except two
  checkerboards at 224 px, which the second test catches. A close-up whose subject fills
  the frame can be as alike (0.32-0.34 on 3 of 60 ecssd-dev crops), but its split is not
  arbitrary: its two sides differ clearly in border contact and closeness to the class
  token (``single.side_evidence``: 0.64 to 2.9 in size on those crops, at most 0.36 on the
  synthetic images this test alone catches at 224 and 448 px), so an image whose split has
  evidence at least ``CLEAR_SIDE`` in size is not alike, as long as its smallest cosine stays
  under ``CLEAR_SIDE_MAX_COSINE``: a solid image's patches are near copies (0.98) and its
  split's evidence is noise (0.65-0.75 for a grey image at 112 px), so it stays alike.
- *Pattern*: the patches split in two, but one side is a repeated pattern (the squares of a
  checkerboard, a moire), not an object: the largest 4-connected piece of that side holds
  less than a quarter of it. Both sides are tested, so the answer does not depend on which
  side the border rule keeps as the mask (a checkerboard's squares on one side, the grid of
  lines between them on the other, connected). On the 200 real images the smaller of the two
  sides' largest-piece shares is at least a third (0.33 at 448 px, 0.48 at 224 px); on the
  two checkerboards 0.17 and 0.01.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

MIN_PAIR_COSINE = 0.3
MIN_LARGEST_PIECE = 0.25
CLEAR_SIDE = 0.5
CLEAR_SIDE_MAX_COSINE = 0.5

ALIKE = (
    "no distinct object: every pair of patches is alike (cosine > "
    f"{MIN_PAIR_COSINE}), so any two-way split would be arbitrary"
)


def min_pair_cosine(cosine: torch.Tensor) -> torch.Tensor:
    """Smallest cosine similarity between two different patches of each image.

    Arguments:
      cosine: ``[B, N, N]`` pair cosines (``ncut.pair_cosine``).

    Returns:
      ``[B]`` minima (1 for a single-patch grid).
    """
    eye = torch.eye(cosine.shape[-1], dtype=torch.bool, device=cosine.device)
    return cosine.masked_fill(eye, 1.0).flatten(1).amin(-1)


def largest_piece(labels: torch.Tensor) -> tuple[int, float]:
    """Number of 4-connected pieces of a foreground and the share of it the largest holds.

    Arguments:
      labels: ``[rows, cols]`` boolean foreground.

    Returns:
      ``(pieces, share)``; ``(0, 1.0)`` for an empty foreground.
    """
    pieces, count = ndimage.label(labels.cpu().numpy())
    if count == 0:
        return 0, 1.0
    sizes = np.bincount(pieces.ravel())[1:]
    return count, float(sizes.max() / sizes.sum())


def no_object_reasons(
    cosine: torch.Tensor, labels: torch.Tensor, side_evidence: torch.Tensor | None = None
) -> list[str | None]:
    """Why each image of a batch holds no distinct object, or None when it does.

    Arguments:
      cosine: ``[B, N, N]`` pair cosines of the patch tokens (``ncut.pair_cosine``).
      labels: ``[B, rows, cols]`` boolean refined split of each image's cut (either side as
        the foreground: both are tested).
      side_evidence: ``[B]`` the split's ``single.side_evidence`` with class tokens, or None:
        a split with evidence at least ``CLEAR_SIDE`` in size whose smallest pair cosine is
        under ``CLEAR_SIDE_MAX_COSINE`` is not "alike".

    Returns:
      One reason (a sentence for run.json and the journal) or None per image.
    """
    smallest = min_pair_cosine(cosine)
    alike = smallest > MIN_PAIR_COSINE
    if side_evidence is not None:
        clear = (side_evidence.abs() >= CLEAR_SIDE) & (smallest < CLEAR_SIDE_MAX_COSINE)
        alike &= ~clear
    reasons: list[str | None] = []
    for index, image_alike in enumerate(alike.tolist()):
        if image_alike:
            reasons.append(ALIKE)
            continue
        count, share = min(
            largest_piece(labels[index]), largest_piece(~labels[index]), key=lambda p: p[1]
        )
        reasons.append(
            None
            if share >= MIN_LARGEST_PIECE
            else (
                f"no distinct object: one side of the split is a pattern of {count} pieces, "
                f"the largest holding {share:.0%} of it (under {MIN_LARGEST_PIECE:.0%})"
            )
        )
    return reasons
