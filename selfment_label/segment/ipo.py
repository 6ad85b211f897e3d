"""Iterative Patch Optimization (Selfment): refine a coarse cut by prototype relabelling.

Each round takes the foreground and background mean of the L2-normalised tokens under the
current labels and relabels every patch by which mean it is closer to (cosine). The
direction ``mean_fg - mean_bg`` of the initial cut is the reference: a round whose direction
points against it has swapped the sides and is flipped back. A round that leaves a side with
fewer than ``min_patches`` patches stops the refinement for that image and keeps the last
labels. A round that changes no label has reached a fixed point (every later round would
repeat it exactly), so that image stops there too: most images settle in a few rounds
(benchmarks/NOTES.md), and the result is the one all rounds would give. Everything is
batched: images that stop leave the batch while the others go on.
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
    # both cosines from one [B, N, D] @ [B, D, 2] product: the tokens are read once
    sides = torch.nn.functional.normalize(torch.stack([mean_fg, mean_bg], dim=-1), dim=1)
    cosines = unit @ sides
    return cosines[:, :, 0] - cosines[:, :, 1]


@dataclass
class _Round:
    """One IPO round of the images still running.

    Arguments:
      labels: ``[R, N]`` labels after the round (the old ones where it was not applied).
      means: ``([R, D], [R, D])`` fg/bg means of those labels.
      applied: ``[R]`` the round kept both sides at ``min_patches`` or more.
      changed: ``[R]`` the round changed at least one label.
    """

    labels: torch.Tensor
    means: tuple[torch.Tensor, torch.Tensor]
    applied: torch.Tensor
    changed: torch.Tensor


def _relabel(
    unit: torch.Tensor,
    active: torch.Tensor,
    reference: torch.Tensor,
    labels: torch.Tensor,
    means: tuple[torch.Tensor, torch.Tensor],
    min_patches: int,
) -> _Round:
    new = (_margin(unit, *means) > 0) & active
    fg_count = new.sum(1)
    bg_count = (active & ~new).sum(1)
    applied = (fg_count >= min_patches) & (bg_count >= min_patches)
    new_fg, new_bg = _side_means(unit, new)
    flipped = ((new_fg - new_bg) * reference).sum(-1) < 0
    if bool(flipped.any()):
        new = torch.where(flipped[:, None], active & ~new, new)
        new_fg, new_bg = _side_means(unit, new)
    keep = applied[:, None]
    new = torch.where(keep, new, labels)
    return _Round(
        labels=new,
        means=(torch.where(keep, new_fg, means[0]), torch.where(keep, new_bg, means[1])),
        applied=applied,
        changed=(new != labels).any(1),
    )


def kept_scores(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft scores clamped to their labels' side of ``THRESHOLD`` (by ``KEPT_MARGIN``), so the
    written mask (scores above it) is exactly ``labels``.

    Arguments:
      scores: ``[..., N]`` soft scores.
      labels: ``[..., N]`` boolean labels.
    """
    return torch.where(
        labels,
        scores.clamp(min=THRESHOLD + KEPT_MARGIN),
        scores.clamp(max=THRESHOLD - KEPT_MARGIN),
    )


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
    rounds = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    # the running images' rows, gathered once and shrunk only when an image stops
    index = torch.arange(labels.shape[0], device=labels.device)
    rows = (unit, active, reference)
    state = (labels, mean_fg, mean_bg)
    for _ in range(iterations):
        step = _relabel(*rows, state[0], state[1:], min_patches)
        rounds[index] += step.applied.long()
        state = (step.labels, *step.means)
        going = step.applied & step.changed
        if not bool(going.all()):
            labels[index], mean_fg[index], mean_bg[index] = state
            index = index[going]
            rows = tuple(t[going] for t in rows)
            state = tuple(t[going] for t in state)
            if index.numel() == 0:
                break
    if iterations == 0:
        scores = labels.float()
    else:
        labels[index], mean_fg[index], mean_bg[index] = state
        scores = torch.sigmoid(_margin(unit, mean_fg, mean_bg) / temperature)
    # the written mask is scores > 0.5: keep it the labelling the stop rule kept
    scores = kept_scores(scores, labels)
    scores = torch.where(active, scores, torch.zeros_like(scores))
    return IpoResult(labels=labels, scores=scores, rounds=rounds)
