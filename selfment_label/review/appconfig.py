"""The App settings ``review`` saves on a run's dataset: colours, sidebar groups, active fields.

Each label field has its own colour (``FIELD_COLORS``; the masks are coloured by field, at
``MASK_OPACITY`` so the image shows through); the sidebar starts with the review tags, the
label fields and the review fields (``score``, ``no_mask_reason``); the labels, ``score`` and
``no_mask_reason`` are the active fields, so the grid shows each sample's score.

A user's own settings are kept: for each of the three settings a digest of what ``review``
wrote is recorded in the dataset's info (``APP_MARKER``), and a later build rewrites a setting
only when the dataset has none or still has the one ``review`` wrote (for example, to colour a
ground-truth field added since). A setting the user changed and saved in the App is left as
it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from .fields import (
    ENTITIES_FIELD,
    GT_FIELD,
    NO_MASK_FIELD,
    PARTS_FIELD,
    PSEUDO_FIELD,
    SCORE_FIELD,
)

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

FIELD_COLORS = {
    PSEUDO_FIELD: "#ff8c00",  # orange
    GT_FIELD: "#1e90ff",  # blue
    ENTITIES_FIELD: "#e6007e",  # magenta
    PARTS_FIELD: "#ffe100",  # yellow
}
"""Colour of each label field's masks, boxes and sidebar entry."""
MASK_OPACITY = 0.45
"""Mask opacity in the App (0: invisible, 1: opaque)."""
APP_MARKER = "app_config"
"""Key, in the dataset's selfment info, of the digests of the settings ``review`` wrote."""
REVIEW_GROUP = "review"


def color_scheme(fields: list[str]) -> fo.ColorScheme:
    """The colour scheme of a dataset whose label fields are ``fields``.

    Arguments:
      fields: the label fields present (of ``FIELD_COLORS``).
    """
    import fiftyone as fo

    return fo.ColorScheme(
        color_by="field",
        opacity=MASK_OPACITY,
        fields=[{"path": field, "fieldColor": FIELD_COLORS[field]} for field in fields],
    )


def sidebar_groups(dataset: fo.Dataset, fields: list[str]) -> list[fo.SidebarGroupDocument]:
    """FiftyOne's default sidebar groups, reordered: tags, labels, review fields, the rest.

    Arguments:
      dataset: the dataset.
      fields: the label fields, in the order to show them.
    """
    import fiftyone as fo

    review = [SCORE_FIELD, NO_MASK_FIELD]
    ordered = [
        fo.SidebarGroupDocument(name="tags", paths=["tags", "_label_tags"], expanded=True),
        fo.SidebarGroupDocument(name="labels", paths=fields, expanded=True),
        fo.SidebarGroupDocument(name=REVIEW_GROUP, paths=review, expanded=True),
    ]
    taken = {"tags", "labels", REVIEW_GROUP}
    for group in fo.DatasetAppConfig.default_sidebar_groups(dataset):
        if group.name in taken:
            continue
        group.paths = [path for path in group.paths if path not in review]
        ordered.append(group)
    return ordered


def active_fields(fields: list[str]) -> fo.ActiveFields:
    """The fields shown by default: the labels, the score and the no-mask reason."""
    import fiftyone as fo

    return fo.ActiveFields(paths=[*fields, SCORE_FIELD, NO_MASK_FIELD])


def _digest(setting: Any) -> str | None:
    if setting is None:
        return None
    if isinstance(setting, list):
        data: Any = [item.to_dict() for item in setting]
    else:
        data = {k: v for k, v in setting.to_dict().items() if k != "_id"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def apply_app_config(dataset: fo.Dataset, info: dict[str, Any]) -> list[str]:
    """Save the review's App settings on ``dataset`` unless the user saved their own.

    The caller saves the dataset (and ``info``, which gets the digests of what was written).

    Arguments:
      dataset: the run's dataset (label fields already added).
      info: the dataset's selfment info; its ``APP_MARKER`` entry is read and updated.

    Returns:
      The settings kept because the user changed them (``color_scheme``, ...).
    """
    fields = [f for f in FIELD_COLORS if dataset.has_sample_field(f)]
    wanted = {
        "color_scheme": color_scheme(fields),
        "sidebar_groups": sidebar_groups(dataset, fields),
        "active_fields": active_fields(fields),
    }
    written = dict(info.get(APP_MARKER, {}))
    kept = []
    for key, setting in wanted.items():
        current = _digest(getattr(dataset.app_config, key))
        if current is not None and current != written.get(key):
            kept.append(key)
            continue
        setattr(dataset.app_config, key, setting)
        written[key] = _digest(setting)
    if kept:
        logger.info("kept the App settings the user saved on %s: %s", dataset.name, kept)
    info[APP_MARKER] = written
    return kept
