"""Entities and their parts (SOHES-style self-exploration), label-free.

The patches of an image are merged bottom-up: at every step the two *adjacent* regions
(4-connected on the patch grid) whose mean L2-normalised features are the most similar
(cosine) are merged. This builds a merge tree; a node is born at the similarity of the merge
that made it and dies at the similarity of the merge that absorbs it. Sweeping the merge
threshold from 1 down to ``merge_floor``, a node exists for the thresholds in
``[death, birth]``: its *persistence* is ``birth - max(death, merge_floor)``.

- Entities: the top-most nodes that persist for at least ``persistence`` and cover at least
  ``min_area`` of the image (nodes born below the floor are never entities, so the whole image
  is one entity only when it is uniform).
- Parts: inside each entity, the top-most persistent nodes below it with the same area rule.

Each region is one ``PatchMask`` with ``level`` (0 entity, 1 part) and, for parts, ``parent``
(index of the entity among the image's masks). Its confidence is how cleanly its patches
separate from the rest of its scope (the image for entities, the entity for parts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import EntitiesConfig
from ..timing import StageTimer
from .base import PatchMask
from .ipo import prototype_scores
from .scores import confidence_score

NO_EDGE = -np.inf


@dataclass
class MergeTree:
    """The bottom-up merge tree of one image's patches.

    Arguments:
      children: ``[M, 2]`` the two nodes each internal node merged (leaves are the patches
        ``0..N-1``; internal node ``N + k`` is the k-th merge).
      birth: ``[N + M]`` similarity at which each node was made (1 for patches).
      death: ``[N + M]`` similarity of the merge that absorbed it (``-inf`` for the roots).
      size: ``[N + M]`` patches in each node.
    """

    children: np.ndarray
    birth: np.ndarray
    death: np.ndarray
    size: np.ndarray

    @property
    def leaves(self) -> int:
        """Number of patches."""
        return len(self.birth) - len(self.children)

    def members(self, node: int) -> np.ndarray:
        """Flat patch indices under ``node``."""
        stack, found = [node], []
        while stack:
            current = stack.pop()
            if current < self.leaves:
                found.append(current)
            else:
                stack.extend(self.children[current - self.leaves])
        return np.array(sorted(found), dtype=np.int64)


def _grid_adjacency(rows: int, cols: int) -> np.ndarray:
    index = np.arange(rows * cols).reshape(rows, cols)
    adjacent = np.zeros((rows * cols, rows * cols), dtype=bool)
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])):
        adjacent[a.ravel(), b.ravel()] = True
        adjacent[b.ravel(), a.ravel()] = True
    return adjacent


def merge_tree(unit: np.ndarray, grid: tuple[int, int]) -> MergeTree:
    """Merge adjacent regions by cosine similarity of their mean features until one is left.

    Arguments:
      unit: ``[N, D]`` L2-normalised patch tokens.
      grid: ``(rows, cols)`` with ``rows * cols == N``.

    Returns:
      The ``MergeTree``.
    """
    n = unit.shape[0]
    sums = unit.astype(np.float64)
    adjacent = _grid_adjacency(*grid)
    norms = np.ones(n)
    sim = np.where(adjacent, sums @ sums.T, NO_EDGE)
    best = sim.max(1)
    best_to = sim.argmax(1)
    node_of = np.arange(n)
    birth = np.ones(2 * n - 1)
    death = np.full(2 * n - 1, NO_EDGE)
    size = np.ones(2 * n - 1, dtype=np.int64)
    children = np.zeros((n - 1, 2), dtype=np.int64)
    merges = 0
    while merges < n - 1:
        a = int(best.argmax())
        similarity = best[a]
        if similarity == NO_EDGE:
            break
        b = int(best_to[a])
        node = n + merges
        children[merges] = node_of[a], node_of[b]
        birth[node] = similarity
        death[node_of[a]] = death[node_of[b]] = similarity
        size[node] = size[node_of[a]] + size[node_of[b]]
        node_of[a] = node
        merges += 1
        sums[a] += sums[b]
        adjacent[a] |= adjacent[b]
        adjacent[:, a] = adjacent[a]
        adjacent[b] = adjacent[:, b] = adjacent[a, a] = False
        norms[a] = max(np.linalg.norm(sums[a]), 1e-12)
        row = np.where(adjacent[a], (sums @ sums[a]) / (norms * norms[a]), NO_EDGE)
        sim[a] = sim[:, a] = row
        sim[b] = sim[:, b] = NO_EDGE
        best[b] = NO_EDGE
        stale = np.flatnonzero((best_to == a) | (best_to == b))
        best[stale] = sim[stale].max(1)
        best_to[stale] = sim[stale].argmax(1)
        better = row > best
        best[better] = row[better]
        best_to[better] = a
        best[a] = row.max()
        best_to[a] = row.argmax()
    kept = n + merges
    return MergeTree(children[:merges], birth[:kept], death[:kept], size[:kept])


def persistent_regions(
    tree: MergeTree, merge_floor: float, persistence: float, min_size: int
) -> list[tuple[int, list[int]]]:
    """Entities and their parts as merge-tree nodes.

    Arguments:
      tree: the merge tree.
      merge_floor: lowest merge threshold explored.
      persistence: threshold range a node must survive to count.
      min_size: fewest patches of an entity or a part.

    Returns:
      ``[(entity node, [part nodes])]``.
    """
    lifetime = tree.birth - np.maximum(tree.death, merge_floor)
    stable = (tree.birth >= merge_floor) & (lifetime >= persistence) & (tree.size >= min_size)
    leaves = tree.leaves

    def top_stable(roots: list[int]) -> list[int]:
        found, stack = [], list(roots)
        while stack:
            node = stack.pop()
            if stable[node]:
                found.append(node)
            elif node >= leaves:
                stack.extend(tree.children[node - leaves])
        return sorted(found)

    has_parent = np.zeros(len(tree.birth), dtype=bool)
    has_parent[tree.children.ravel()] = True
    roots = [int(r) for r in np.flatnonzero(~has_parent)]
    return [
        (entity, top_stable(list(tree.children[entity - leaves])) if entity >= leaves else [])
        for entity in top_stable(roots)
    ]


@dataclass
class Entities(EntitiesConfig):
    """Label-free entity + part segmenter (options: ``EntitiesConfig``)."""

    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """Entities (level 0) then parts (level 1, with ``parent``) for each image."""
        return [self.image_regions(image, timer) for image in tokens]

    def image_regions(self, tokens: torch.Tensor, timer: StageTimer) -> list[PatchMask]:
        """Regions of one image.

        Arguments:
          tokens: ``[rows, cols, D]`` patch tokens of one image.
          timer: stage timer (``merge`` stage).

        Returns:
          Entities first, then the parts of each entity.
        """
        rows, cols, dim = tokens.shape
        unit = torch.nn.functional.normalize(tokens.reshape(rows * cols, dim).float(), dim=-1)
        with timer.stage("merge"):
            tree = merge_tree(unit.cpu().numpy(), (rows, cols))
            min_size = max(1, int(np.ceil(self.min_area * rows * cols)))
            found = persistent_regions(tree, self.merge_floor, self.persistence, min_size)
        whole = torch.ones(rows * cols, dtype=torch.bool, device=tokens.device)
        entities: list[PatchMask] = []
        parts: list[PatchMask] = []
        for parent, (entity, part_nodes) in enumerate(found):
            inside = self._region(tree, entity, whole.device)
            entities.append(self._patch_mask(unit, inside, whole, (rows, cols), {"level": 0}))
            for node in part_nodes:
                part = self._region(tree, node, whole.device)
                extra = {"level": 1, "parent": parent}
                parts.append(self._patch_mask(unit, part, inside, (rows, cols), extra))
        return entities + parts

    @staticmethod
    def _region(tree: MergeTree, node: int, device: torch.device) -> torch.Tensor:
        region = torch.zeros(tree.leaves, dtype=torch.bool)
        region[torch.from_numpy(tree.members(node))] = True
        return region.to(device)

    @staticmethod
    def _patch_mask(
        unit: torch.Tensor,
        region: torch.Tensor,
        scope: torch.Tensor,
        grid: tuple[int, int],
        extra: dict[str, Any],
    ) -> PatchMask:
        inside = region[scope]
        probability = prototype_scores(unit[scope][None], inside[None])[0]
        confidence = float(confidence_score(probability, inside))
        return PatchMask(scores=region.float().reshape(grid), score=confidence, extra=extra)
