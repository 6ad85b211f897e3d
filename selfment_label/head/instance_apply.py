"""The instance head as a segmenter: many scored, disjoint masks per image."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import InstanceApplyConfig
from ..device import small_kernel_threads
from ..segment.base import PatchMask
from ..timing import StageTimer
from .instance_model import (
    THREADS,
    InstanceHead,
    Prediction,
    level_predictions,
    select_instances,
    select_parts,
)


@dataclass
class InstanceHeadSegmenter:
    """Segmenter that runs a trained instance head on patch tokens.

    Each image gets the head's masks that ``select_instances`` keeps (score, NMS, cap,
    painted in score order), best score first; a head with part queries adds the parts of
    each (``select_parts``, level 1 with their ``parent``). The pipeline's full-size path
    keeps siblings disjoint and parts inside their object (``masks.full_size_masks``).

    Arguments:
      head: the trained instance head, on the backbone's device.
      head_sha256: sha256 of its checkpoint (recorded, and compared when a run resumes).
      select: which predictions are written.
    """

    head: InstanceHead
    head_sha256: str
    select: InstanceApplyConfig

    def options(self) -> dict[str, Any]:
        """Options that decide the masks (``parts`` when the head writes parts)."""
        return {
            "mode": "head",
            "task": "instances",
            "head_sha256": self.head_sha256,
            **asdict(self.select),
            **({"parts": True} if self.head.part_queries is not None else {}),
        }

    @property
    def zoomable(self) -> bool:
        """Whether a run may merge zoomed crops' masks (``zoom``): the head writes flat,
        disjoint instances (no parts)."""
        return self.head.part_queries is None

    def to(self, device: torch.device | str) -> InstanceHeadSegmenter:
        """This segmenter with its head on ``device`` (a Ray actor moves it to its GPU)."""
        return InstanceHeadSegmenter(self.head.to(device), self.head_sha256, self.select)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """The kept masks of each image of a ``[B, rows, cols, D]`` batch: the objects, then
        (a head with part queries) the parts of each, with ``level`` and ``parent``."""
        with timer.stage("head"), small_kernel_threads(tokens.device, THREADS):
            return [
                self._image_masks(objects, parts)
                for objects, parts in level_predictions(self.head, tokens)
            ]

    def _image_masks(self, objects: Prediction, parts: Prediction) -> list[PatchMask]:
        kept = select_instances(objects, self.select)
        levels = self.head.part_queries is not None
        found = [
            PatchMask(probability, float(score), {"level": 0} if levels else {})
            for probability, score in zip(kept.probabilities, kept.scores.tolist(), strict=True)
        ]
        for parent, chosen in select_parts(kept, parts, self.select) if levels else []:
            found += [
                PatchMask(probability, float(score), {"level": 1, "parent": parent})
                for probability, score in zip(
                    chosen.probabilities, chosen.scores.tolist(), strict=True
                )
            ]
        return found
