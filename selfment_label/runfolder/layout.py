"""What a run folder holds, and the one reader of a finished run.

A run folder (written by ``run`` or ``apply``) holds:

- ``annotations.json``: COCO with RLE masks, one image entry per labelled image;
- ``run.json``: provenance (input folder, backbone identity, options, counts, seconds);
- ``journal.jsonl`` and ``.lock``: the resumable state of the run (see ``journal``);
- ``scores/<file name>.png``: soft score maps, with ``--save-scores``;
- ``features/``: the feature cache ``train`` fills (see ``features.cache``);
- ``review.json``: ``{"datasets": [...]}``, the FiftyOne datasets that review the run, the
  latest last (written by ``review``; read by ``export``, ``train --reviewed`` and ``review``).

Every consumer (eval, review, train, export) reads a run through ``read_run``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..atomic import atomic_write_json, truncate_name
from ..data.storage import is_uri
from ..errors import SelfmentError
from .coco import RleError, decode_rle, load_coco, masks_by_image

ANNOTATIONS_NAME = "annotations.json"
RUN_NAME = "run.json"
JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = ".lock"
SCORES_DIR = "scores"
FEATURES_DIR = "features"
REVIEW_NAME = "review.json"
RUN_FILES = frozenset(
    {ANNOTATIONS_NAME, RUN_NAME, JOURNAL_NAME, LOCK_NAME, SCORES_DIR, FEATURES_DIR, REVIEW_NAME}
)
"""The names a run folder keeps for itself: no other output may take them."""


class RunFolderError(SelfmentError, RuntimeError):
    """A folder is not a finished run folder, or its files cannot be read."""


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a selfment-label run (``run.json`` + journal, or a lock)."""
    return (folder / LOCK_NAME).exists() or (
        (folder / RUN_NAME).is_file() and (folder / JOURNAL_NAME).is_file()
    )


def is_relative_name(file_name: Any) -> bool:
    """Whether an image's ``file_name`` is one ``run`` writes: a non-empty relative POSIX path
    without ``..`` or backslashes, so it names a file inside the run's input folder."""
    if not isinstance(file_name, str) or not file_name or "\\" in file_name:
        return False
    parts = PurePosixPath(file_name).parts
    return parts[0] != "/" and ".." not in parts


SCORE_NAME_BYTES = 200
"""Longest score map name, in bytes (file systems allow 255 and the image's own name may use
them all)."""


def score_map_path(file_name: str) -> str:
    """Relative path, inside a run folder, of an image's soft score map: ``scores/<file
    name>.png``, or, when that name would be longer than ``SCORE_NAME_BYTES`` or the file
    name has empty, ``.`` or ``..`` parts (object keys may), a name inside ``scores/`` with a
    hash of the whole file name (``scores/<start>-<hash>.png``)."""
    folder, _, name = file_name.rpartition("/")
    unsafe = any(part in ("", ".", "..") for part in file_name.split("/"))
    if unsafe:  # an object key such as a/../../x.jpg must not lead out of scores/
        folder, name = "", file_name.replace("/", "_")
    stored = f"{name}.png"
    if unsafe or len(os.fsencode(stored)) > SCORE_NAME_BYTES:
        digest = hashlib.sha256(os.fsencode(file_name)).hexdigest()[:16]
        stored = f"{truncate_name(name, SCORE_NAME_BYTES - len(digest) - 5)}-{digest}.png"
    return "/".join(part for part in (SCORES_DIR, folder, stored) if part)


@dataclass
class RunFolder:
    """A finished run folder, read.

    Arguments:
      path: the folder.
      coco: its ``annotations.json``.
      provenance: its ``run.json`` (empty when the folder has only annotations.json).
    """

    path: Path
    coco: dict[str, Any]
    provenance: dict[str, Any]

    def _recorded(self, key: str) -> Any:
        if key not in self.provenance:
            raise RunFolderError(
                f"{self.path / RUN_NAME} is missing or does not record {key!r}; "
                "it was not written by a finished `selfment-label run`"
            )
        return self.provenance[key]

    @property
    def input_dir(self) -> Path:
        """The local folder the run's images came from.

        Raises:
          RunFolderError: the run read its images from object storage (``s3://...``); the
            consumers of a run (review, train, export) read images from a local folder.
        """
        recorded = str(self._recorded("input_dir"))
        if is_uri(recorded):
            raise RunFolderError(
                f"{self.path} was labelled from object storage ({recorded}), and review, train "
                "and export read images from a local folder",
                remedy="input_dir",
            )
        return Path(recorded)

    @property
    def options(self) -> dict[str, Any]:
        """The run's options (shared and those of its mode)."""
        return self._recorded("options")

    @property
    def mode(self) -> str:
        """``single``, ``instances``, ``entities`` or ``head``."""
        return self.provenance.get("options", {}).get("mode", "single")

    @property
    def backbone(self) -> dict[str, Any]:
        """The backbone identity (preset, timm id, weights sha256, weights file)."""
        return self._recorded("backbone")

    @property
    def resolution(self) -> int:
        """The long side, in pixels, the backbone saw."""
        return int(self.options["resolution"])

    def images(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """``(image entry, its annotations)`` for every labelled image."""
        return masks_by_image(self.coco)

    def score_map(self, image: dict[str, Any]) -> Path | None:
        """The absolute path of an image's saved score map, or None."""
        relative = image.get("score_map")
        return self.path / relative if relative else None


def read_run(run_dir: str | Path, require_provenance: bool = True) -> RunFolder:
    """Read a run folder's ``annotations.json`` and ``run.json``.

    Arguments:
      run_dir: the folder.
      require_provenance: refuse a folder without ``run.json`` (eval accepts a bare COCO).

    Raises:
      RunFolderError: a file is missing or unreadable.
    """
    run_dir = Path(run_dir)
    names = (ANNOTATIONS_NAME, RUN_NAME) if require_provenance else (ANNOTATIONS_NAME,)
    for name in names:
        if not (run_dir / name).is_file():
            raise RunFolderError(
                f"{run_dir} is not a finished run folder: {name} not found", remedy="run_dir"
            )
    try:
        coco = load_coco(run_dir / ANNOTATIONS_NAME)
        provenance: dict[str, Any] = {}
        if (run_dir / RUN_NAME).is_file():
            provenance = json.loads((run_dir / RUN_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunFolderError(f"cannot read the run folder {run_dir}: {error}") from None
    if not isinstance(provenance, dict):
        raise RunFolderError(f"{run_dir / RUN_NAME} is not a JSON object")
    return RunFolder(path=run_dir, coco=coco, provenance=provenance)


def union_mask(
    width: int, height: int, annotations: list[dict[str, Any]], what: str = "the image"
) -> np.ndarray:
    """The union of annotation masks (all levels), ``[height, width]`` boolean.

    Raises:
      RunFolderError: an annotation's RLE is corrupt or not ``width x height``.
    """
    union = np.zeros((height, width), dtype=bool)
    for ann in annotations:
        try:
            union |= decode_rle(ann["segmentation"], (height, width))
        except RleError as error:
            raise RunFolderError(f"annotation {ann.get('id')} of {what}: {error}") from None
    return union


def reviewing_datasets(run_dir: str | Path) -> list[str]:
    """The FiftyOne dataset names recorded in a run's ``review.json``, the latest last.

    Raises:
      RunFolderError: ``review.json`` exists but cannot be read.
    """
    path = Path(run_dir) / REVIEW_NAME
    if not path.is_file():
        return []
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("datasets", [])
    except (OSError, ValueError, AttributeError) as error:
        raise RunFolderError(f"cannot read {path}: {error}") from None
    return [str(name) for name in names]


def record_reviewing_dataset(run_dir: str | Path, name: str) -> None:
    """Record (atomically) that the FiftyOne dataset ``name`` reviews the run; it becomes the
    latest."""
    names = [n for n in reviewing_datasets(run_dir) if n != name] + [name]
    atomic_write_json(Path(run_dir) / REVIEW_NAME, {"datasets": names})
