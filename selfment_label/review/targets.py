"""Training targets from a reviewed dataset: what ``train --reviewed`` learns from.

A sample counts when it belongs to the run (``run_dir`` field), passes the tag filters
(``export.select_samples``), and its target is the union of the masks now in its label
fields: deleted masks are gone, edited or imported masks count as they are.
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
      targets: ``(file name, width, height, [height, width] boolean mask)`` per sample.
    """

    dataset: str
    tags: list[str]
    exclude_tags: list[str]
    targets: list[tuple[str, int, int, np.ndarray]] = field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint records about its reviewed data."""
        return {
            "dataset": self.dataset,
            "tags": self.tags,
            "exclude_tags": self.exclude_tags,
            "samples": len(self.targets),
        }


def sample_mask(sample: Any, fields: Sequence[str], width: int, height: int) -> np.ndarray:
    """The union of a sample's detection masks over ``fields``, ``[height, width]`` boolean."""
    union = np.zeros((height, width), dtype=bool)
    for name in fields:
        labels = sample[name] if sample.has_field(name) else None
        for detection in labels.detections if labels is not None else []:
            union |= detection_to_mask(detection, width, height)
    return union


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
        mask = sample_mask(sample, fields, width, height)
        result.targets.append((sample.file_name, width, height, mask))
    return result
