"""What a run records: every finished image and skip in the journal as it comes (``RunRecorder``),
the fingerprint a resumed run must match, what the run did (``RunSummary``) and the provenance
written to ``run.json``."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_path
from ..config import RunConfig
from ..data.storage import ContentKey
from ..engine import FinishedImage, Labeller
from ..timing import StageTimer
from .journal import Journal
from .layout import score_map_path

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str, "str | None"], None]


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the second (run.json's dates)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunSummary:
    """What a run did.

    Arguments:
      out_dir: the run folder.
      total: images found.
      labelled: images labelled by this invocation.
      resumed: images already done by an earlier invocation.
      skipped: file name -> reason, for every skipped image in the folder.
      annotations: annotations written to annotations.json.
      seconds: wall-clock seconds of this invocation's labelling loop.
      stages: seconds per stage.
      new_skips: file name -> reason, for the images this invocation skipped.
      notes: file name -> the segmenter's notes (e.g. the eigensolver stopped at its cap).
      wall_seconds: wall-clock seconds of the whole invocation, model loading and the final
        COCO writing included.
    """

    out_dir: Path
    total: int
    labelled: int
    resumed: int
    skipped: dict[str, str]
    annotations: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    new_skips: dict[str, str] = field(default_factory=dict)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Throughput of this invocation (labelled or skipped images per second)."""
        done = self.labelled + len(self.new_skips)
        return done / self.seconds if self.seconds > 0 else 0.0


class RunRecorder:
    """The driver's side of a run: journals finished images and skips as they come, writes
    score maps into the run folder, counts, and reports progress (the engine's ``Recorder``).

    Arguments:
      out_dir: the run folder.
      journal: its open journal.
      keys: content key of every image of the run.
      total: images in the run.
      resumed: images already done by an earlier invocation.
      progress: called after every image with ``(done, total, file_name, skip_reason)``.
      timer: the run's stage timer (its ``write`` stage is charged here).
    """

    def __init__(
        self,
        out_dir: Path,
        journal: Journal,
        keys: dict[str, ContentKey],
        total: int,
        resumed: int,
        progress: ProgressCallback | None,
        timer: StageTimer,
    ):
        self.out_dir = out_dir
        self.journal = journal
        self.keys = keys
        self.total = total
        self.done = resumed
        self.labelled = 0
        self.new_skips: dict[str, str] = {}
        self.progress = progress
        self.timer = timer

    def skip(self, file_name: str, reason: str) -> None:
        """Journal that an image was skipped, and why."""
        key = self.keys[file_name]
        self.journal.add({"kind": "skip", "file_name": file_name, "key": key, "reason": reason})
        self.new_skips[file_name] = reason
        logger.warning("skipped %s: %s", file_name, reason)
        self._advance(file_name, reason)

    def image(self, finished: FinishedImage) -> None:
        """Journal a labelled image (its score map written first, atomically)."""
        with self.timer.stage("write"):
            entry: dict[str, Any] = {
                "kind": "image",
                "file_name": finished.file_name,
                "key": self.keys[finished.file_name],
                "width": finished.width,
                "height": finished.height,
            }
            if finished.score_png is not None:
                entry["score_map"] = self._write_score_map(finished)
            entry["annotations"] = finished.annotations
            if finished.notes:
                entry["notes"] = finished.notes
            self.journal.add(entry)
        self.labelled += 1
        self._advance(finished.file_name, None)

    def _write_score_map(self, finished: FinishedImage) -> str:
        rel = score_map_path(finished.file_name)
        with atomic_path(self.out_dir / rel) as tmp:
            tmp.write_bytes(finished.score_png or b"")
        return rel

    def _advance(self, file_name: str, reason: str | None) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, file_name, reason)


def fingerprint(config: RunConfig, labeller: Labeller) -> dict[str, Any]:
    """What makes two runs' masks comparable: a journal written under another fingerprint is
    not resumed (``Journal``)."""
    identity = labeller.backbone.identity()
    return {
        "backbone": identity["backbone"],
        "timm_id": identity["timm_id"],
        "weights_sha256": identity["weights_sha256"],
        "resolution": config.resolution,
        "precision": labeller.choice.name,
        "save_scores": config.save_scores,
        "refine": config.refine,
        **({"zoom": config.zoom} if config.zoom is not None else {}),
        **labeller.segmenter.options(),
    }


def provenance(
    summary: RunSummary,
    config: RunConfig,
    labeller: Labeller,
    input_uri: str,
    started: str,
    images_labelled: int,
) -> dict[str, Any]:
    """run.json: the tool, when, the input, the model and options, the environment, and what
    this invocation and the run as a whole did."""
    return {
        "tool": "selfment-label",
        "version": __version__,
        "started": started,
        "finished": utc_now(),
        "input_dir": input_uri,
        "backbone": labeller.backbone.identity(),
        "options": {**config.shared_options(), **labeller.segmenter.options()},
        "device": str(labeller.device),
        "precision": labeller.choice.as_dict(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "images_found": summary.total,
        "images_labelled": images_labelled,
        "annotations": summary.annotations,
        "labelled_this_invocation": summary.labelled,
        "resumed_from_journal": summary.resumed,
        "images_skipped": summary.skipped,
        "image_notes": summary.notes,
        "stage_seconds": summary.stages,
        "seconds": round(summary.seconds, 3),
        "wall_seconds": round(summary.wall_seconds, 3),
        "images_per_second": round(summary.images_per_second, 3),
    }
