"""Segmenters: from a batch of patch tokens to soft patch masks.

A segmenter takes ``[B, rows, cols, D]`` tokens of images that share one patch grid and
returns, for every image, a list of ``PatchMask`` (one per object). The pipeline turns them
into full-size masks. ``NcutIpo`` is the label-free engine (TokenCut's Normalized Cut, then
Selfment's Iterative Patch Optimization).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .ipo import iterative_patch_optimization, prototype_scores
from .masks import confidence_score
from .ncut import normalized_cut
from .timing import StageTimer


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
    """

    tau: float = 0.2
    ipo_iters: int = 20

    def options(self) -> dict[str, Any]:
        """Options that decide the masks."""
        return {"mode": "single", "tau": self.tau, "ipo_iters": self.ipo_iters}

    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """One ``PatchMask`` per image."""
        b, rows, cols, dim = tokens.shape
        flat = tokens.reshape(b, rows * cols, dim)
        with timer.stage("ncut"):
            cut, _ = normalized_cut(flat, (rows, cols), tau=self.tau)
        with timer.stage("ipo"):
            refined = iterative_patch_optimization(flat, cut.reshape(b, -1), self.ipo_iters)
            unit = torch.nn.functional.normalize(flat, dim=-1)
            probability = prototype_scores(unit, refined.labels)
            confidence = confidence_score(probability, refined.labels).tolist()
        return [
            [PatchMask(scores=refined.scores[i].reshape(rows, cols), score=confidence[i])]
            for i in range(b)
        ]
