"""Several objects per image: CutLER's MaskCut with Selfment's IPO on every instance.

The Normalized Cut is repeated on the same patch graph; after each cut the tokens of the
patches already taken are zeroed, so they lose their strong edges and the next cut finds
another object among the free patches. A new cut stops the search when its mask overlaps an
earlier instance by IoU > 0.5 (the cut found the removed object again) or when the refined
instance covers no more than ``min_area`` of the image. Each instance is refined by IPO over
the still-free patches only, so instances are disjoint on the patch grid; the pipeline keeps
them disjoint at full size (``masks.full_size_masks``). The refined labels of one cut are
split into 4-connected components: the one holding the cut's strongest patch is the cut's
instance, and every other component larger than ``min_area`` that holds fewer than three grid
corners is an instance too (IPO gathers look-alike objects that lie apart, such as a second
animal of the same kind, which later cuts on a graph of mostly background rarely find).

The first cut is single mode's cut: refined by IPO over the whole image, swapped for its
complement when single mode's side rule takes it for the background (``border_prior``,
``single.border_swap``), and tested for no distinct object (``objectness``: then the image
gets no instance and a ``no_object`` note). From the second cut on, the free patches are
mostly background, so a cut whose foreground holds three or four of the grid's corners is
flipped (CutLER's corner rule), and an instance that still holds three corners or more than
``LATER_MAX_BORDER`` of the border patches is a piece of background: the search stops there
(and such extra components are dropped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage

from ..config import InstancesConfig
from ..timing import StageTimer
from .base import THRESHOLD, ImageMasks, PatchMask
from .ipo import iterative_patch_optimization, prototype_scores
from .ncut import linked, pair_cosine, second_eigenvector, seed_component
from .objectness import no_object_reasons
from .scores import border_fraction, confidence_score, mask_iou
from .single import border_swap

logger = logging.getLogger(__name__)

OVERLAP_IOU = 0.5
LATER_MAX_BORDER = 0.3


def _corner_count(mask: torch.Tensor) -> int:
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def is_background(mask: torch.Tensor) -> bool:
    """Whether a later instance is a piece of background: it holds three or four grid corners
    (CutLER's rule) or more than ``LATER_MAX_BORDER`` of the grid's border patches."""
    return _corner_count(mask) >= 3 or float(border_fraction(mask[None])[0]) > LATER_MAX_BORDER


def split_components(
    labels: torch.Tensor, vector: torch.Tensor, grid: tuple[int, int], min_area: float
) -> list[torch.Tensor]:
    """4-connected components of ``labels`` larger than ``min_area`` of the grid.

    Arguments:
      labels: ``[N]`` boolean patch labels.
      vector: ``[N]`` eigenvector; components come in the order of their largest ``|v|``.
      grid: ``(rows, cols)``.
      min_area: smallest component kept, as a fraction of the grid.

    Returns:
      ``[N]`` boolean masks, one per kept component.
    """
    components, count = ndimage.label(labels.view(grid).cpu().numpy())
    if count == 0:
        return []
    strength = vector.abs().view(grid).cpu().numpy()
    peaks = ndimage.maximum(strength, components, np.arange(1, count + 1))
    component_ids = torch.from_numpy(components.reshape(-1)).to(labels.device)
    kept = []
    for index in np.argsort(-np.asarray(peaks), kind="stable"):
        component = component_ids == int(index) + 1
        if component.sum() > min_area * component.numel():
            kept.append(component)
    return kept


def split_free_patches(
    vector: torch.Tensor, free: torch.Tensor, grid: tuple[int, int], corner_rule: bool
) -> torch.Tensor:
    """TokenCut's split of one eigenvector, seeded among the free patches.

    Foreground is ``v > mean(v)`` (mean over the free patches); the seed is the free patch
    with the largest ``|v|``; the split is flipped when the seed falls in the background or,
    with ``corner_rule``, when the foreground holds at least three grid corners; the
    4-connected component of the seed is kept. Taken patches may belong to the result (the
    caller compares it with the earlier instances).

    Arguments:
      vector: ``[N]`` second eigenvector.
      free: ``[N]`` boolean mask of patches not yet taken.
      grid: ``(rows, cols)``.
      corner_rule: apply CutLER's corner rule.

    Returns:
      ``[rows, cols]`` boolean mask.
    """
    fg = vector > vector[free].mean()
    seed = torch.where(free, vector.abs(), torch.full_like(vector, -1.0)).argmax()
    if not bool(fg[seed]) or (corner_rule and _corner_count(fg.view(grid)) >= 3):
        fg = ~fg
    if not bool(fg[seed]):
        seed = torch.where(free & fg, vector.abs(), torch.full_like(vector, -1.0)).argmax()
    return seed_component(fg.view(1, *grid), seed[None])[0]


@dataclass
class _Search:
    """The state of one image's instance search.

    Arguments:
      flat: ``[N, D]`` tokens.
      unit: ``[N, D]`` L2-normalised tokens.
      grid: ``(rows, cols)``.
      free: ``[N]`` patches no instance has taken yet.
      taken: the instances' ``[N]`` boolean masks, in the order found.
      instances: the instances found.
    """

    flat: torch.Tensor
    unit: torch.Tensor
    grid: tuple[int, int]
    free: torch.Tensor
    taken: list[torch.Tensor] = field(default_factory=list)
    instances: ImageMasks = field(default_factory=ImageMasks)

    @classmethod
    def of(cls, tokens: torch.Tensor) -> _Search:
        """The search's start on ``[rows, cols, D]`` tokens: every patch free."""
        rows, cols, dim = tokens.shape
        flat = tokens.reshape(rows * cols, dim).float()
        free = torch.ones(rows * cols, dtype=torch.bool, device=tokens.device)
        return cls(flat, torch.nn.functional.normalize(flat, dim=-1), (rows, cols), free)


@dataclass
class _Cut:
    """One Normalized Cut of the free patches.

    Arguments:
      mask: ``[N]`` boolean foreground of the cut (taken patches may belong to it).
      vector: ``[N]`` its second eigenvector.
      cosine: ``[1, N, N]`` the graph's cosine similarities.
    """

    mask: torch.Tensor
    vector: torch.Tensor
    cosine: torch.Tensor


@dataclass
class _Refined:
    """IPO's labels of one cut.

    Arguments:
      labels: ``[N]`` boolean refined labels.
      scores: ``[N]`` soft scores.
      cut: ``[N]`` the cut's foreground (complemented with the labels when swapped).
    """

    labels: torch.Tensor
    scores: torch.Tensor
    cut: torch.Tensor


@dataclass
class MaskCut(InstancesConfig):
    """Label-free multi-instance segmenter: MaskCut + IPO (options: ``InstancesConfig``)."""

    takes_class_tokens: ClassVar[bool] = True
    zoomable: ClassVar[bool] = True
    """Its instances are flat and disjoint: a run may merge zoomed crops' (``zoom``)."""

    def __call__(
        self, tokens: torch.Tensor, timer: StageTimer, class_tokens: torch.Tensor | None = None
    ) -> list[list[PatchMask]]:
        """Up to ``max_instances`` disjoint ``PatchMask`` per image (``class_tokens``:
        ``[B, D]``, used for the first cut's side when given)."""
        if class_tokens is None:
            return [self.image_instances(image, timer) for image in tokens]
        return [
            self.image_instances(image, timer, token)
            for image, token in zip(tokens, class_tokens, strict=True)
        ]

    @staticmethod
    def _seed_side(
        labels: torch.Tensor, cut: torch.Tensor, vector: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        # IPO relabels patches by feature alone; keep the refined component that holds the
        # cut's strongest patch, so one instance is one connected object
        start = labels & cut
        if not bool(start.any()):
            return start
        seed = torch.where(start, vector.abs(), torch.full_like(vector, -1.0)).argmax()
        return seed_component(labels.view(1, *grid), seed[None])[0].reshape(-1)

    def image_instances(
        self, tokens: torch.Tensor, timer: StageTimer, class_token: torch.Tensor | None = None
    ) -> ImageMasks:
        """Instances of one image.

        Arguments:
          tokens: ``[rows, cols, D]`` patch tokens of one image.
          timer: stage timer (``ncut`` and ``ipo`` stages).
          class_token: ``[D]`` its class token, or None (``single.border_swap``).

        Returns:
          The instances, largest-eigenvector-first, each with its own confidence; none,
          with a ``no_object`` note, when the image holds no distinct object.
        """
        search = _Search.of(tokens)
        for index in range(self.max_instances):
            with timer.stage("ncut"):
                cut = self._next_cut(search, index)
            if cut is None:
                break
            with timer.stage("ipo"):
                refined = self._refine(search, cut)
                if index == 0:
                    refined = self._first_side(search, refined, class_token)
                    reason = no_object_reasons(cut.cosine, refined.labels.view(1, *search.grid))
                    if reason[0]:
                        return ImageMasks([], {"no_object": reason[0]})
                found = self._new_instances(search, refined, cut.vector, index)
                if not found:
                    break
                self._take(search, found, refined.scores)
            if len(search.instances) >= self.max_instances:
                break
        return search.instances

    def _next_cut(self, search: _Search, index: int) -> _Cut | None:
        """The next cut of the free patches; ``None`` when the search is over (fewer than two
        free patches, a cut of taken patches only, or one that finds an earlier instance
        again: IoU > ``OVERLAP_IOU``)."""
        if int(search.free.sum()) < 2:
            return None
        cosine = pair_cosine((search.flat * search.free[:, None])[None])
        vector = second_eigenvector(linked(cosine, self.tau)).vectors[0]
        mask = split_free_patches(vector, search.free, search.grid, corner_rule=index > 0)
        mask = mask.reshape(-1)
        if not bool((mask & search.free).any()):
            return None
        if any(float(mask_iou(mask, earlier)) > OVERLAP_IOU for earlier in search.taken):
            logger.debug("instance %d overlaps an earlier one: stop", index)
            return None
        return _Cut(mask, vector, cosine)

    def _refine(self, search: _Search, cut: _Cut) -> _Refined:
        """IPO over the free patches, from the cut's free part."""
        start = cut.mask & search.free
        refined = iterative_patch_optimization(
            search.flat[None], start[None], self.ipo_iters, active=search.free[None]
        )
        return _Refined(refined.labels[0], refined.scores[0], start)

    def _first_side(
        self, search: _Search, refined: _Refined, class_token: torch.Tensor | None
    ) -> _Refined:
        """The first cut swapped for its complement when single mode's side rule takes it for
        the background (with the image's ``[D]`` class token when there is one)."""
        labels = refined.labels.view(1, *search.grid)
        classes = None if class_token is None else class_token[None]
        if bool(border_swap(labels, search.flat[None], self.border_prior, classes)):
            return _Refined(~refined.labels, 1.0 - refined.scores, ~refined.cut & search.free)
        return refined

    def _new_instances(
        self, search: _Search, refined: _Refined, vector: torch.Tensor, index: int
    ) -> list[torch.Tensor]:
        """The cut's instance (its seed's component) and the other components it gathered;
        none when the instance is too small (``min_area``) or, after the first, background."""
        grid = search.grid
        labels = self._seed_side(refined.labels, refined.cut, vector, grid)
        if labels.sum() <= self.min_area * labels.numel():
            logger.debug("instance %d is too small: stop", index)
            return []
        if index > 0 and is_background(labels.view(grid)):
            logger.debug("instance %d is the background: stop", index)
            return []
        others = [
            component
            for component in split_components(refined.labels & ~labels, vector, grid, self.min_area)
            if not is_background(component.view(grid))
        ]
        return [labels, *others][: self.max_instances - len(search.instances)]

    def _take(self, search: _Search, found: list[torch.Tensor], scores: torch.Tensor) -> None:
        """Record the found instances with their own confidence and mark their patches taken."""
        for mask in found:
            probability = prototype_scores(search.unit[None], mask[None])[0]
            free = search.free
            confidence = float(confidence_score(probability[free], mask[free]))
            own = torch.where(mask, scores, scores.clamp(max=THRESHOLD))
            search.instances.append(PatchMask(scores=own.reshape(search.grid), score=confidence))
            search.taken.append(mask)
            search.free = free & ~mask
