"""Names of the fields and the dataset info key of a run's FiftyOne dataset."""

PSEUDO_FIELD = "pseudo"
"""Masks of the ``single`` and ``instances`` modes (``fo.Detections``)."""
ENTITIES_FIELD = "entities"
"""Level-0 masks of the ``entities`` mode."""
PARTS_FIELD = "parts"
"""Level-1 masks of the ``entities`` mode (``parent_id``: their entity's ``coco_id``)."""
GT_FIELD = "ground_truth"
"""Ground-truth masks added with ``review --gt``."""
RUN_FIELD = "run_dir"
"""The run folder a sample's labels came from."""
SCORE_FIELD = "score"
"""The best score the run gave a sample's top-level masks (None: no mask)."""
NO_MASK_FIELD = "no_mask_reason"
"""Why the run wrote no mask for the image (None: it wrote some)."""
KEY_FIELD = "content_key"
"""The image's content key when the run labelled it (``[size, mtime_ns]`` as JSON text)."""
REPLACED_TAGS_FIELD = "tags_before_image_changed"
"""The tags a sample had before its image was replaced (see ``review.dataset``)."""
INFO_KEY = "selfment"
"""Key of the run's description in ``dataset.info``."""


def label_fields(mode: str) -> list[str]:
    """The detection fields that hold a run's labels, top level first.

    Arguments:
      mode: the run's mode (``single``, ``instances`` or ``entities``).
    """
    return [ENTITIES_FIELD, PARTS_FIELD] if mode == "entities" else [PSEUDO_FIELD]


APPROVED_TAG = "approved"
REJECTED_TAG = "rejected"
"""The sample tags of a review; a sample with neither is not reviewed yet."""
