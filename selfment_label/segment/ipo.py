"""Iterative Patch Optimization (Selfment): refine a coarse cut by prototype relabelling.

Each round takes the foreground and background mean of the L2-normalised tokens under the
current labels and relabels every patch by which mean it is closer to (cosine). The
direction ``mean_fg - mean_bg`` of the initial cut is the reference: a round whose direction
points against it has swapped the sides and is flipped back. A round that leaves a side with
fewer than ``min_patches`` patches stops the refinement for that image and keeps the last
labels. Everything is batched: images that stop early are frozen while the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SingleConfig
from .base import THRESHOLD

PATCH_TEMPERATURE = 0.05
KEPT_MARGIN = 1e-3


@dataclass
class IpoResult:
    """Refined labels and soft patch scores.

    Arguments:
      labels: ``[B, N]`` boolean foreground labels.
      scores: ``[B, N]`` soft foreground scores in [0, 1]: the prototype scores of the final
        labels (or the labels themselves, as 0/1, when no round ran), clamped to the kept
        labels' side of 0.5 so that ``scores > 0.5`` is exactly ``labels``.
      rounds: ``[B]`` rounds actually applied to each image.
    """

    labels: torch.Tensor
    scores: torch.Tensor
    rounds: torch.Tensor


def _side_means(unit: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # one [B, 2, N] @ [B, N, D] product instead of two broadcast [B, N, D] temporaries
    fg = labels.to(unit.dtype)
    sides = torch.stack([fg, 1.0 - fg], dim=1)
    means = (sides @ unit) / sides.sum(-1, keepdim=True).clamp_min(1.0)
    return means[:, 0], means[:, 1]


def prototype_scores(
    unit: torch.Tensor, labels: torch.Tensor, temperature: float = PATCH_TEMPERATURE
) -> torch.Tensor:
    """Soft foreground score per patch from the fg/bg prototypes of ``labels``.

    ``sigmoid((cos(t, mean_fg) - cos(t, mean_bg)) / temperature)``; 0.5 is exactly the IPO
    decision boundary.

    Arguments:
      unit: ``[B, N, D]`` L2-normalised tokens.
      labels: ``[B, N]`` boolean labels.
      temperature: softness of the score.

    Returns:
      ``[B, N]`` scores in [0, 1].
    """
    mean_fg, mean_bg = _side_means(unit, labels)
    return torch.sigmoid(_margin(unit, mean_fg, mean_bg) / temperature)


def _margin(unit: torch.Tensor, mean_fg: torch.Tensor, mean_bg: torch.Tensor) -> torch.Tensor:
    fg = torch.nn.functional.normalize(mean_fg, dim=-1)
    bg = torch.nn.functional.normalize(mean_bg, dim=-1)
    return (unit @ fg[:, :, None] - unit @ bg[:, :, None])[:, :, 0]


def iterative_patch_optimization(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    iterations: int = SingleConfig.ipo_iters,
    min_patches: int = 10,
    temperature: float = PATCH_TEMPERATURE,
    active: torch.Tensor | None = None,
) -> IpoResult:
    """Refine boolean patch labels by prototype relabelling, batched.

    Arguments:
      tokens: ``[B, N, D]`` patch tokens (normalised inside).
      labels: ``[B, N]`` initial foreground labels (the cut).
      iterations: rounds; 0 returns the cut with prototype scores of the cut.
      min_patches: a round leaving fewer patches on a side stops that image.
      temperature: softness of the returned scores.
      active: optional ``[B, N]`` boolean mask of patches that take part (others stay
        background and get score 0); used by multi-instance cuts.

    Returns:
      An ``IpoResult``.
    """
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    if active is None:
        active = torch.ones_like(labels, dtype=torch.bool)
    labels = labels & active
    mean_fg, mean_bg = _side_means(unit, labels)
    reference = mean_fg - mean_bg
    running = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    rounds = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    for _ in range(iterations):
        new = (_margin(unit, mean_fg, mean_bg) > 0) & active
        fg_count = new.sum(1)
        bg_count = (active & ~new).sum(1)
        degenerate = (fg_count < min_patches) | (bg_count < min_patches)
        new_fg, new_bg = _side_means(unit, new)
        flipped = ((new_fg - new_bg) * reference).sum(-1) < 0
        new = torch.where(flipped[:, None], active & ~new, new)
        running = running & ~degenerate
        labels = torch.where(running[:, None], new, labels)
        rounds = rounds + running.long()
        if not bool(running.any()):
            break
        mean_fg, mean_bg = _side_means(unit, labels)
    if iterations == 0:
        scores = labels.float()
    else:
        scores = prototype_scores(unit, labels, temperature)
    # the written mask is scores > 0.5: keep it the labelling the stop rule kept
    scores = torch.where(
        labels,
        scores.clamp(min=THRESHOLD + KEPT_MARGIN),
        scores.clamp(max=THRESHOLD - KEPT_MARGIN),
    )
    scores = torch.where(active, scores, torch.zeros_like(scores))
    return IpoResult(labels=labels, scores=scores, rounds=rounds)
