"""Train/validation splits for exports: by a seeded hash of the file name, or by review tags.

The hash split is stable: an image's side depends only on its own name and the seed, never on
which other images are exported or in what order, so re-exporting after labelling more images
keeps every earlier image on its side.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from ..config import EXPORT_SPLIT_SEED, EXPORT_VAL_FRACTION
from ..errors import SelfmentError

logger = logging.getLogger(__name__)

TRAIN = "train"
VAL = "val"
SPLITS = (TRAIN, VAL)


class SplitError(SelfmentError, ValueError):
    """Split options or tags that cannot give a split."""


def name_fraction(name: str, seed: int = EXPORT_SPLIT_SEED) -> float:
    """A number in ``[0, 1)`` fixed by ``name`` and ``seed`` (SHA-1 of ``"<seed>:<name>"``).

    Arguments:
      name: the image's relative file name (case-sensitive, POSIX separators).
      seed: the split seed.
    """
    digest = hashlib.sha1(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_splits(
    names: Iterable[str], val_fraction: float = EXPORT_VAL_FRACTION, seed: int = EXPORT_SPLIT_SEED
) -> dict[str, str]:
    """Name -> ``train`` or ``val``: ``val`` when ``name_fraction(name, seed) < val_fraction``.

    With ``val_fraction > 0``, at least two images and none drawn into ``val`` (a small export),
    the image with the smallest fraction goes to ``val`` so the split is never empty; that one
    may move back to ``train`` when a later, larger export draws others.

    Arguments:
      names: the images' relative file names.
      val_fraction: the expected share of ``val`` images, in ``[0, 1)``.
      seed: the split seed.

    Raises:
      SplitError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SplitError(f"the validation fraction must be in [0, 1), not {val_fraction}")
    fractions = {name: name_fraction(name, seed) for name in names}
    splits = {name: VAL if f < val_fraction else TRAIN for name, f in fractions.items()}
    if val_fraction > 0 and len(splits) >= 2 and VAL not in splits.values():
        splits[min(fractions, key=fractions.__getitem__)] = VAL
    return splits


def tag_splits(tags_by_name: dict[str, list[str]]) -> dict[str, str]:
    """Name -> split from the reviewer's ``train``/``val`` tags; untagged images go to ``train``.

    Arguments:
      tags_by_name: each image's tags.

    Raises:
      SplitError: an image carries both tags.
    """
    splits: dict[str, str] = {}
    both = [name for name, tags in tags_by_name.items() if TRAIN in tags and VAL in tags]
    if both:
        raise SplitError(
            f"{len(both)} image(s) are tagged both {TRAIN!r} and {VAL!r}, e.g. {both[0]!r}"
        )
    untagged = 0
    for name, tags in tags_by_name.items():
        splits[name] = VAL if VAL in tags else TRAIN
        untagged += TRAIN not in tags and VAL not in tags
    if untagged:
        logger.warning("%d image(s) have neither a train nor a val tag: put in train", untagged)
    return splits
