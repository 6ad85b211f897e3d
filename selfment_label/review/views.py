"""The saved views ``review`` keeps on a run's dataset, the reviewer's starting points.

Every build saves (replacing the previous version of) ``LOWEST_SCORE_VIEW``,
``UNREVIEWED_VIEW`` and ``NO_MASK_VIEW``, and per mode ``SEVERAL_INSTANCES_VIEW``
(``instances``) or ``ENTITIES_WITH_PARTS_VIEW`` (``entities``). Views the user saved under
other names are left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .fields import (
    APPROVED_TAG,
    ENTITIES_FIELD,
    NO_MASK_FIELD,
    PARTS_FIELD,
    PSEUDO_FIELD,
    REJECTED_TAG,
    SCORE_FIELD,
)

if TYPE_CHECKING:
    import fiftyone as fo

LOWEST_SCORE_VIEW = "lowest score first"
UNREVIEWED_VIEW = "not reviewed yet"
NO_MASK_VIEW = "no mask"
SEVERAL_INSTANCES_VIEW = "several instances"
ENTITIES_WITH_PARTS_VIEW = "entities with parts"


def review_views(dataset: fo.Dataset, mode: str) -> dict[str, tuple[fo.DatasetView, str]]:
    """The views of a run's dataset for its mode: name -> (view, description).

    Arguments:
      dataset: the run's dataset (with its ``score`` and ``no_mask_reason`` fields).
      mode: the run's mode.
    """
    from fiftyone import ViewField as F

    by_score = dataset.sort_by(SCORE_FIELD)
    views = {
        LOWEST_SCORE_VIEW: (
            by_score,
            "every sample, by the run's best mask score, lowest (and no mask) first",
        ),
        UNREVIEWED_VIEW: (
            by_score.match_tags([APPROVED_TAG, REJECTED_TAG], bool=False),
            "samples tagged neither approved nor rejected, lowest score first",
        ),
        NO_MASK_VIEW: (
            dataset.exists(NO_MASK_FIELD),
            f"images the run wrote no mask for; {NO_MASK_FIELD} says why",
        ),
    }
    if mode == "instances":
        views[SEVERAL_INSTANCES_VIEW] = (
            dataset.match(F(f"{PSEUDO_FIELD}.detections").length() > 1).sort_by(SCORE_FIELD),
            "images with more than one instance, lowest score first",
        )
    if mode == "entities":
        views[ENTITIES_WITH_PARTS_VIEW] = (
            dataset.match(F(f"{PARTS_FIELD}.detections").length() > 0).sort_by(SCORE_FIELD),
            f"images whose {ENTITIES_FIELD} have {PARTS_FIELD} (a part's parent_id is its "
            "entity's coco_id), lowest score first",
        )
    return views


def save_review_views(dataset: fo.Dataset, mode: str) -> list[str]:
    """Save (or replace) the review's views on ``dataset``; return their names.

    Arguments:
      dataset: the run's dataset.
      mode: the run's mode.
    """
    views = review_views(dataset, mode)
    for name, (view, description) in views.items():
        dataset.save_view(name, view, description=description, overwrite=True)
    return list(views)
