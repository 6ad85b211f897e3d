"""Segmenters: from a batch of patch tokens to soft patch masks.

A segmenter takes ``[B, rows, cols, D]`` tokens of images that share one patch grid and
returns, for every image, a list of ``PatchMask`` (one per object). The pipeline turns them
into full-size masks. ``NcutIpo`` is the label-free engine (TokenCut's Normalized Cut, then
Selfment's Iterative Patch Optimization).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from .ipo import iterative_patch_optimization
from .masks import border_fraction, stability_score
from .ncut import normalized_cut
from .timing import StageTimer

SCORE_TEMPERATURE = 0.1
MAX_BORDER = 0.5


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


def dataclass_options(mode: str, segmenter: Any) -> dict[str, Any]:
    """A dataclass segmenter's options: its mode and every one of its fields.

    Deriving them from the fields keeps every option in the fingerprint that a resumed run
    is compared by.
    """
    return {"mode": mode, **asdict(segmenter)}


class Segmenter(Protocol):
    """What the pipeline needs from a segmenter."""

    def options(self) -> dict[str, Any]:
        """The options that decide its results (recorded and compared on resume)."""
        ...

    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """Patch masks for each image of a ``[B, rows, cols, D]`` batch."""
        ...


@dataclass
class NcutIpo:
    """Label-free single-object segmenter: Normalized Cut, then IPO.

    Arguments:
      tau: affinity threshold of the graph.
      ipo_iters: IPO rounds (0 keeps the raw cut).
      temperature: softness of the prototype scores ``sigmoid(margin / temperature)``; it
        shapes the soft map (threshold sweeps, MAE), not the 0.5 mask.
      max_border: a mask that covers more than this fraction of the image's border patches
        is taken for the background and swapped with its complement (1 disables).
    """

    tau: float = 0.2
    ipo_iters: int = 20
    temperature: float = SCORE_TEMPERATURE
    max_border: float = MAX_BORDER

    def options(self) -> dict[str, Any]:
        """Options that decide the masks."""
        return dataclass_options("single", self)

    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """One ``PatchMask`` per image."""
        b, rows, cols, dim = tokens.shape
        flat = tokens.reshape(b, rows * cols, dim)
        with timer.stage("ncut"):
            cut, _ = normalized_cut(flat, (rows, cols), tau=self.tau)
        with timer.stage("ipo"):
            refined = iterative_patch_optimization(
                flat, cut.reshape(b, -1), self.ipo_iters, temperature=self.temperature
            )
            labels = refined.labels.reshape(b, rows, cols)
            scores = refined.scores.reshape(b, rows, cols)
            swapped = (border_fraction(labels) > self.max_border)[:, None, None]
            labels = torch.where(swapped, ~labels, labels)
            scores = torch.where(swapped, 1.0 - scores, scores)
            confidence = stability_score(torch.where(swapped, ~cut, cut), labels).tolist()
        return [[PatchMask(scores=scores[i], score=confidence[i])] for i in range(b)]
