"""``single`` mode: one main object per image (TokenCut's Normalized Cut, then Selfment's IPO)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SingleConfig
from ..timing import StageTimer
from .base import ImageMasks, PatchMask
from .ipo import iterative_patch_optimization
from .ncut import min_pair_cosine, normalized_cut
from .scores import border_fraction, stability_score

MAX_BORDER = 0.5
NO_OBJECT_MIN_COSINE = 0.3
NO_OBJECT = (
    "no distinct object: every pair of patches is alike (cosine > "
    f"{NO_OBJECT_MIN_COSINE}), so any two-way split would be arbitrary"
)
EIGENSOLVER_CAPPED = "stopped at its iteration cap before converging: the cut may be arbitrary"


@dataclass
class NcutIpo(SingleConfig):
    """Label-free single-object segmenter: Normalized Cut, then IPO (options: ``SingleConfig``)."""

    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """One ``PatchMask`` per image."""
        b, rows, cols, dim = tokens.shape
        flat = tokens.reshape(b, rows * cols, dim)
        with timer.stage("ncut"):
            cut, eigen = normalized_cut(flat, (rows, cols), tau=self.tau)
        with timer.stage("ipo"):
            refined = iterative_patch_optimization(
                flat, cut.reshape(b, -1), self.ipo_iters, temperature=self.temperature
            )
            labels = refined.labels.reshape(b, rows, cols)
            scores = refined.scores.reshape(b, rows, cols)
            swapped = (border_fraction(labels) > MAX_BORDER)[:, None, None] & self.border_prior
            labels = torch.where(swapped, ~labels, labels)
            scores = torch.where(swapped, 1.0 - scores, scores)
            confidence = stability_score(torch.where(swapped, ~cut, cut), labels).tolist()
        capped = (~eigen.converged).tolist()
        alike = (min_pair_cosine(flat) > NO_OBJECT_MIN_COSINE).tolist()
        return [
            ImageMasks([], {"no_object": NO_OBJECT})
            if alike[i]
            else ImageMasks(
                [PatchMask(scores=scores[i], score=confidence[i])],
                {"eigensolver": EIGENSOLVER_CAPPED} if capped[i] else None,
            )
            for i in range(b)
        ]
