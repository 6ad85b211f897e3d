"""Entities and their parts (SOHES-style self-exploration), label-free.

The patches of an image are merged bottom-up: at every step the two *adjacent* regions
(4-connected on the patch grid) whose mean L2-normalised features are the most similar
(cosine) are merged. This builds a merge tree. A node's level is the lowest merge
similarity on its path from the patches (merging by mean features can make a merged region
more alike to a neighbour than its halves were to each other; taking the minimum keeps the
levels monotone, so a parent never sits above its children). A node is born at its level and
dies at its parent's. Sweeping the merge threshold from 1 down to ``merge_floor``, a node
exists for the thresholds in ``[death, birth]``: its *persistence* is
``birth - max(death, merge_floor)``.

- Entities: the top-most nodes that persist for at least ``persistence`` and cover at least
  ``min_area`` of the image (nodes born below the floor are never entities, so the whole image
  is one entity only when it is uniform).
- Parts: inside each entity, the top-most persistent nodes below it with the same area rule.

Each region is one ``PatchMask`` with ``level`` (0 entity, 1 part) and, for parts, ``parent``
(index of the entity among the image's masks). Its confidence is how cleanly its patches
separate from the rest of its scope (the image for entities, the entity for parts).
"""

from __future__ import annotations

import heapq
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
HEAP_SLACK = 8


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


def _grid_edges(rows: int, cols: int) -> list[set[int]]:
    index = np.arange(rows * cols).reshape(rows, cols)
    neighbours: list[set[int]] = [set() for _ in range(rows * cols)]
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])):
        for i, j in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
            neighbours[i].add(j)
            neighbours[j].add(i)
    return neighbours


def merge_tree(unit: np.ndarray, grid: tuple[int, int]) -> MergeTree:
    """Merge adjacent regions by cosine similarity of their mean features until one is left.

    Regions live in a sparse adjacency (a neighbour set per region) and the candidate merges
    in a heap with lazy deletion, compacted whenever it holds more than ``HEAP_SLACK`` entries
    per region left, so memory is ``O(N * D)`` for ``N`` patches of dimension ``D`` (no
    ``N x N`` matrix).

    Merging by mean features is not monotone: after ``A`` and ``B`` merge, ``A + B`` may be
    more alike to a neighbour than ``A`` was to ``B``. A node's level is therefore the
    lowest merge similarity on its path from the leaves (``min`` of its merge similarity and
    its children's levels), so a parent is never born above its children and every node's
    lifetime ``[death, birth]`` is a proper (possibly empty) interval.

    Arguments:
      unit: ``[N, D]`` L2-normalised patch tokens.
      grid: ``(rows, cols)`` with ``rows * cols == N``.

    Returns:
      The ``MergeTree``.
    """
    n = unit.shape[0]
    sums = unit.astype(np.float64)
    neighbours = _grid_edges(*grid)
    node_of = list(range(n))
    version = [0] * n
    birth = np.ones(2 * n - 1)
    death = np.full(2 * n - 1, NO_EDGE)
    size = np.ones(2 * n - 1, dtype=np.int64)
    children = np.zeros((max(n - 1, 0), 2), dtype=np.int64)

    norms = np.maximum(np.linalg.norm(sums, axis=1), 1e-12)
    heap = []
    index = np.arange(n).reshape(grid)
    plane = unit.reshape(*grid, -1)
    for near, far, low, high in (
        (plane[:, :-1], plane[:, 1:], index[:, :-1], index[:, 1:]),
        (plane[:-1], plane[1:], index[:-1], index[1:]),
    ):
        cosine = np.einsum("rcd,rcd->rc", near, far).ravel().tolist()
        heap += [
            (-c, i, j, 0, 0)
            for c, i, j in zip(cosine, low.ravel().tolist(), high.ravel().tolist(), strict=True)
        ]
    heapq.heapify(heap)
    merges = 0
    while heap:
        negative, a, b, version_a, version_b = heapq.heappop(heap)
        if version[a] != version_a or version[b] != version_b:
            continue
        node = n + merges
        children[merges] = node_of[a], node_of[b]
        birth[node] = min(-negative, birth[node_of[a]], birth[node_of[b]])
        death[node_of[a]] = death[node_of[b]] = birth[node]
        size[node] = size[node_of[a]] + size[node_of[b]]
        merges += 1
        sums[a] += sums[b]
        node_of[a] = node
        version[a] += 1
        version[b] = -1
        for other in neighbours[b] - {a}:
            neighbours[other].discard(b)
            neighbours[other].add(a)
        neighbours[a] |= neighbours[b]
        neighbours[a] -= {a, b}
        neighbours[b] = set()
        norms[a] = max(float(np.linalg.norm(sums[a])), 1e-12)
        around = list(neighbours[a])
        cosine = (sums[around] @ sums[a]) / (norms[around] * norms[a])
        for other, value in zip(around, cosine.tolist(), strict=True):
            low, high = min(a, other), max(a, other)
            heapq.heappush(heap, (-value, low, high, version[low], version[high]))
        if len(heap) > HEAP_SLACK * (n - merges):
            # drop stale candidates so the heap stays O(live edges), not O(all pushes)
            heap = [e for e in heap if version[e[1]] == e[3] and version[e[2]] == e[4]]
            heapq.heapify(heap)
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
