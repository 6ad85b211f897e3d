"""Training targets from a reviewed dataset: what ``train --reviewed`` learns from.

A sample counts when it belongs to the run (``run_dir`` field), passes the tag filters
(``export.select_samples``), and its masks are those now in its label fields: deleted masks
are gone, edited or imported masks count as they are. The single-object head learns the
union of a sample's masks; the instance head learns each one (parts, ``level`` 1, apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import REVIEW_EXCLUDE_TAGS
from .convert import detection_to_mask
from .dataset import INFO_KEY, PSEUDO_FIELD, RUN_FIELD, load_run_dataset
from .export import select_samples


@dataclass
class ReviewedTargets:
    """The targets of a reviewed dataset, and where they came from.

    Arguments:
      dataset: the dataset's name.
      tags: samples kept had any of these tags (none: every sample).
      exclude_tags: samples with any of these tags were left out.
      instances: ``(file name, width, height, objects, parts)`` per sample: its
        ``[height, width]`` boolean masks, parts (detections of ``level`` 1) apart.
    """

    dataset: str
    tags: list[str]
    exclude_tags: list[str]
    instances: list[tuple[str, int, int, list[np.ndarray], list[np.ndarray]]] = field(
        default_factory=list
    )

    @property
    def targets(self) -> list[tuple[str, int, int, np.ndarray]]:
        """``(file name, width, height, [height, width] union of its masks)`` per sample."""
        return [
            (name, width, height, np.logical_or.reduce([*objects, *parts, _empty(width, height)]))
            for name, width, height, objects, parts in self.instances
        ]

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint records about its reviewed data."""
        return {
            "dataset": self.dataset,
            "tags": self.tags,
            "exclude_tags": self.exclude_tags,
            "samples": len(self.instances),
        }


def _empty(width: int, height: int) -> np.ndarray:
    return np.zeros((height, width), dtype=bool)


def sample_masks(
    sample: Any, fields: Sequence[str], width: int, height: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A sample's ``[height, width]`` boolean detection masks over ``fields``: objects, and
    parts (detections whose ``level`` attribute is 1) apart."""
    objects, parts = [], []
    for name in fields:
        labels = sample[name] if sample.has_field(name) else None
        for detection in labels.detections if labels is not None else []:
            level = detection.get_field("level") if detection.has_field("level") else 0
            found = parts if level else objects
            found.append(detection_to_mask(detection, width, height))
    return objects, parts


def reviewed_targets(
    run_dir: str | Path,
    name: str | None = None,
    tags: Sequence[str] | None = None,
    exclude_tags: Sequence[str] | None = REVIEW_EXCLUDE_TAGS,
) -> ReviewedTargets:
    """The training targets of a run's reviewed dataset.

    Arguments:
      run_dir: the run folder the dataset reviews (only its samples count).
      name: the dataset (default: the latest recorded in the run's ``review.json``).
      tags: keep only samples with any of these tags.
      exclude_tags: leave out samples with any of these tags.

    Raises:
      NotReviewed: no dataset reviews the run.
    """
    from fiftyone import ViewField as F

    dataset = load_run_dataset(run_dir, name)
    fields = dataset.info.get(INFO_KEY, {}).get("label_fields", [PSEUDO_FIELD])
    mine = dataset.match(F(RUN_FIELD) == str(Path(run_dir).resolve()))
    view = select_samples(mine, list(tags or []), list(exclude_tags or []))
    result = ReviewedTargets(dataset.name, list(tags or []), list(exclude_tags or []))
    for sample in view.sort_by("file_name").iter_samples(progress=False):
        width, height = int(sample.metadata.width), int(sample.metadata.height)
        objects, parts = sample_masks(sample, fields, width, height)
        result.instances.append((sample.file_name, width, height, objects, parts))
    return result
