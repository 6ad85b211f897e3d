"""``single`` mode: one main object per image (TokenCut's Normalized Cut, then Selfment's IPO)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import SingleConfig
from ..timing import StageTimer
from .base import ImageMasks, PatchMask
from .ipo import iterative_patch_optimization, kept_scores, prototype_scores
from .ncut import normalized_cut, pair_cosine
from .objectness import CLEAR_SIDE, no_object_reasons
from .scores import (
    agreement_score,
    centre_start,
    class_excess,
    frame_excess,
    uniformity_excess,
)

SCORE_ROUNDS = 20
UNIFORMITY_WEIGHT = 1.0
UNIFORMITY_WEIGHT_ALONE = 2.5
CLASS_WEIGHT = 2.5
EIGENSOLVER_CAPPED = "stopped at its iteration cap before converging: the cut may be arbitrary"


def side_evidence(
    labels: torch.Tensor, tokens: torch.Tensor, class_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B]`` evidence that each mask is the background side of its cut (above 0) rather
    than the object (below 0); its complement's is the opposite.

    ``frame_excess`` (the log-odds of the mask's share of the grid's border patches minus
    those of its share of the grid) plus ``UNIFORMITY_WEIGHT`` x ``uniformity_excess`` (how
    much more alike its patches are than its complement's) minus ``CLASS_WEIGHT`` x
    ``class_excess`` (how much closer its patches are to the image's class token than its
    complement's). Border contact fixes close-ups (the subject touching most of the frame)
    and a photo under a band of sky, which a rule on the border fraction alone took for the
    background; the class token settles the close-ups whose two sides hold the border in
    proportion to their size, and a sky that fills most of the frame. Without class tokens
    (a caller with patch tokens only) the class term is left out and uniformity weighs
    ``UNIFORMITY_WEIGHT_ALONE``: it then has to tell a large sky from the photo under it
    alone. The weights are chosen on the failure sets and ecssd-dev
    (``benchmarks/failure_sets.py``; docs/quality-report.md).

    Arguments:
      labels: ``[B, rows, cols]`` boolean masks.
      tokens: ``[B, rows * cols, D]`` their patch tokens.
      class_tokens: ``[B, D]`` the images' class tokens, or None.
    """
    if class_tokens is None:
        excess = UNIFORMITY_WEIGHT_ALONE * uniformity_excess(tokens, labels)
    else:
        excess = UNIFORMITY_WEIGHT * uniformity_excess(tokens, labels)
        excess = excess - CLASS_WEIGHT * class_excess(tokens, labels, class_tokens)
    return frame_excess(labels) + excess


def border_swap(
    labels: torch.Tensor,
    tokens: torch.Tensor,
    enabled: bool,
    class_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B]`` whether each mask is the background side of its cut (``side_evidence`` above
    0); all False when the prior is off.

    Arguments:
      labels: ``[B, rows, cols]`` boolean masks.
      tokens: ``[B, rows * cols, D]`` their patch tokens.
      enabled: the border prior is on.
      class_tokens: ``[B, D]`` the images' class tokens, or None.
    """
    return (side_evidence(labels, tokens, class_tokens) > 0) & enabled


def frame_interior(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[1, rows * cols]`` boolean: the grid's patches off its outermost ring."""
    rows, cols = grid
    inner = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    inner[1:-1, 1:-1] = True
    return inner.reshape(1, -1)


def join_inner_part(
    labels: torch.Tensor,
    scores: torch.Tensor,
    evidence: torch.Tensor,
    tokens: torch.Tensor,
    class_tokens: torch.Tensor | None,
    iterations: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Join a mask whose cut ran inside the object with the rest of the object.

    When the subject fills most of the frame, the strongest split of its patches can run
    inside it (a dog's head against its body and the grass strip beside it, a cat's dark
    patches against its white fur): the mask is a part of the object and its complement the
    rest of it plus a strip of background along the frame. Such a split is not clear, its
    two sides hold the border, the class token and their uniformity about alike
    (``side_evidence`` under ``objectness.CLEAR_SIDE`` in size), where a cut between an
    object and its background is clear. For those images the complement is split in two by
    IPO started from its patches off the frame's outermost ring (its part in the middle of
    the picture against its part along the frame), and the middle part joins the mask when
    the union is a clear object (evidence at most ``-CLEAR_SIDE``). A clear split is never
    changed (docs/quality-report.md, "A cut inside the object").

    Arguments:
      labels: ``[B, rows, cols]`` boolean masks (the object side of each cut).
      scores: ``[B, rows, cols]`` their soft scores.
      evidence: ``[B]`` each mask's ``side_evidence`` (below 0: the object side).
      tokens: ``[B, rows * cols, D]`` patch tokens.
      class_tokens: ``[B, D]`` class tokens, or None.
      iterations: IPO rounds of the complement's split.
      temperature: softness of the joined masks' prototype scores.

    Returns:
      ``([B, rows, cols] labels, [B, rows, cols] scores)``, joined where the rule took.
    """
    b, rows, cols = labels.shape
    unclear = evidence.abs() < CLEAR_SIDE
    if not bool(unclear.any()):
        return labels, scores
    flat = labels.reshape(b, -1)
    rest = ~flat
    start = rest & frame_interior((rows, cols), labels.device)
    inner = iterative_patch_optimization(tokens, start, iterations, active=rest).labels
    union = flat | inner
    joined_evidence = side_evidence(union.reshape(b, rows, cols), tokens, class_tokens)
    joined = unclear & inner.any(-1) & (joined_evidence <= -CLEAR_SIDE)
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    union_scores = kept_scores(prototype_scores(unit, union, temperature), union)
    keep = joined[:, None, None]
    return (
        torch.where(keep, union.reshape(b, rows, cols), labels),
        torch.where(keep, union_scores.reshape(b, rows, cols), scores),
    )


@dataclass
class NcutIpo(SingleConfig):
    """Label-free single-object segmenter: Normalized Cut, then IPO (options: ``SingleConfig``)."""

    takes_class_tokens: ClassVar[bool] = True
    picks_grid: ClassVar[bool] = True
    """Its score (blind-start agreement) compares masks of one image on different patch grids:
    the engine labels a thin image on more than one grid and keeps the best (``Labeller``)."""

    def __call__(
        self, tokens: torch.Tensor, timer: StageTimer, class_tokens: torch.Tensor | None = None
    ) -> list[list[PatchMask]]:
        """One ``PatchMask`` per image, or none with a ``no_object`` note (``class_tokens``:
        ``[B, D]``, used by ``border_swap`` when given)."""
        b, rows, cols, dim = tokens.shape
        flat = tokens.reshape(b, rows * cols, dim)
        with timer.stage("ncut"):
            cosine = pair_cosine(flat)
            cut, eigen = normalized_cut(cosine, (rows, cols), tau=self.tau)
        with timer.stage("ipo"):
            refined = iterative_patch_optimization(
                flat, cut.reshape(b, -1), self.ipo_iters, temperature=self.temperature
            )
            labels = refined.labels.reshape(b, rows, cols)
            scores = refined.scores.reshape(b, rows, cols)
            evidence = side_evidence(labels, flat, class_tokens)
            swapped = ((evidence > 0) & self.border_prior)[:, None, None]
            labels = torch.where(swapped, ~labels, labels)
            scores = torch.where(swapped, 1.0 - scores, scores)
            evidence = torch.where(swapped[:, 0, 0], -evidence, evidence)  # the mask's own
            side = labels
            if class_tokens is not None and self.border_prior:
                labels, scores = join_inner_part(
                    labels, scores, evidence, flat, class_tokens, self.ipo_iters, self.temperature
                )
            blind = iterative_patch_optimization(
                flat, centre_start(b, (rows, cols), flat.device), SCORE_ROUNDS
            ).labels.reshape(b, rows, cols)
            swap_blind = border_swap(blind, flat, self.border_prior, class_tokens)[:, None, None]
            blind = torch.where(swap_blind, ~blind, blind)
            confidence = agreement_score(labels, torch.where(swapped, ~cut, cut), blind).tolist()
        capped = (~eigen.converged).tolist()
        # whether there is an object at all is decided on the cut's own split
        empty = no_object_reasons(cosine, side, None if class_tokens is None else evidence)
        return [
            ImageMasks([], {"no_object": empty[i]})
            if empty[i]
            else ImageMasks(
                [PatchMask(scores=scores[i], score=confidence[i])],
                {"eigensolver": EIGENSOLVER_CAPPED} if capped[i] else None,
            )
            for i in range(b)
        ]
