"""The labelling pipeline: stream images -> patch tokens -> segmenter -> masks -> journal -> COCO.

Images are decoded in background threads while the model runs, grouped into batches that
share a patch grid, and every finished image is journalled at once, so a killed run resumes
where it stopped and memory stays flat in the folder size. The final ``annotations.json``
and ``run.json`` are written atomically from the journal.
"""

from __future__ import annotations

import io
import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from .. import __version__
from ..atomic import atomic_path, atomic_write_json
from ..config import DEFAULT_PRECISION, RunConfig
from ..data.batching import batches_by_grid, prefetch, stack_pixels
from ..data.images import DecodedImage, ImageSkip, prepare_image
from ..data.storage import ContentKey, ImageSource, is_uri, open_source
from ..device import resolve_device, resolve_precision, small_kernel_threads
from ..errors import SelfmentError
from ..features.backbone import Backbone, build_backbone
from ..masks import full_size_masks
from ..outputs import check_output
from ..refine import check_available, guide_side
from ..segment.base import PatchMask, Segmenter, segment_batch
from ..segment.registry import make_segmenter
from ..timing import StageTimer
from .coco import annotation_record, write_coco_stream
from .journal import Journal, RunConflict, RunLock
from .layout import (
    ANNOTATIONS_NAME,
    JOURNAL_NAME,
    LOCK_NAME,
    RUN_NAME,
    SCORES_DIR,
    is_run_folder,
    score_map_path,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str, "str | None"], None]


class NoImages(SelfmentError, RuntimeError):
    """The input folder has no images."""


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


def backbone_for(config: RunConfig) -> Backbone:
    """Build the backbone (preset, weights, device, download policy) a run config asks for."""
    return build_backbone(
        config.backbone,
        config.weights,
        resolve_device(config.device),
        allow_download=config.allow_download,
    )


def input_name(input_dir: str | Path) -> str:
    """The input folder's name (a URI's last part)."""
    if is_uri(input_dir):
        return str(input_dir).rstrip("/").rsplit("/", 1)[-1]
    return Path(input_dir).resolve().name


def default_out_dir(input_dir: str | Path) -> Path:
    """``./<folder name>-selfment`` in the current directory."""
    return Path.cwd() / f"{input_name(input_dir)}-selfment"


def input_source(input_dir: str | Path, out_dir: Path) -> ImageSource:
    """The images to label: a URI's objects, or every image under a local folder except those
    inside ``out_dir`` or any other run folder (a run folder inside the input never labels its
    own outputs)."""
    if is_uri(input_dir):
        return open_source(input_dir)
    input_dir = Path(input_dir)
    if out_dir.resolve() == input_dir.resolve():
        raise RunConflict(
            f"--out {out_dir} is the input folder itself; choose a folder for the run's files"
        )
    out = out_dir.resolve()
    return open_source(
        input_dir, skip_folder=lambda folder: folder.resolve() == out or is_run_folder(folder)
    )


def clear_run(out_dir: Path) -> None:
    """Remove a previous run's outputs (journal, annotations, run.json, score maps)."""
    for name in (JOURNAL_NAME, ANNOTATIONS_NAME, RUN_NAME):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SCORES_DIR, ignore_errors=True)


def check_run_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before the model loads and with nothing changed on disk, a run folder that
    cannot be written (``outputs.check_output``), holds an annotations.json this tool did not
    journal (without ``overwrite``), or is busy with another process.

    Raises:
      OutputError: the folder is a file, below a file, or not writable.
      RunConflict: a foreign annotations.json, or another process holds the folder's lock.
    """
    check_output(out_dir, "the run folder", folder=True)
    _refuse_foreign_annotations(out_dir, overwrite)
    if (out_dir / LOCK_NAME).exists():
        with RunLock(out_dir):
            pass


def _refuse_foreign_annotations(out_dir: Path, overwrite: bool) -> None:
    foreign = (out_dir / ANNOTATIONS_NAME).exists() and not (out_dir / JOURNAL_NAME).exists()
    if foreign and not overwrite:
        raise RunConflict(
            f"{out_dir} already holds an annotations.json that this tool did not journal; "
            "use --overwrite to replace it, or choose another --out"
        )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    _refuse_foreign_annotations(out_dir, overwrite)
    if overwrite:
        clear_run(out_dir)


@dataclass
class FinishedImage:
    """One labelled image, made where the model ran and journalled by the run's driver.

    Arguments:
      file_name: path relative to the input root.
      width, height: the image's displayed size.
      annotations: its annotation records (``annotation_record``).
      notes: what the segmenter noted about it (empty: nothing).
      score_png: its soft score map as an 8-bit PNG, when score maps are saved.
    """

    file_name: str
    width: int
    height: int
    annotations: list[dict[str, Any]]
    notes: dict[str, Any]
    score_png: bytes | None = None


def _score_png(soft: torch.Tensor) -> bytes:
    array = (soft.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Labeller:
    """Runs a backbone and a segmenter over decoded images and makes full-size masks.

    The same object labels a local run and, inside each Ray actor, a distributed one.

    Arguments:
      backbone: the frozen feature extractor.
      segmenter: turns patch tokens into patch masks.
      precision: precision of the backbone (``auto``, ``fp32``, ``fp16``, ``bf16``), resolved
        on the backbone's device (``choice``).
      refine: edge refinement of the full-size masks (``REFINE_METHODS``); the decoded
        images must carry their guide (``guide_side(refine)``) unless it is ``none``.
    """

    def __init__(
        self,
        backbone: Backbone,
        segmenter: Segmenter,
        precision: str = DEFAULT_PRECISION,
        refine: str = "none",
    ):
        self.backbone = backbone
        self.segmenter = segmenter
        self.precision = precision
        self.refine = refine
        self.device = backbone.device
        self.choice = resolve_precision(precision, self.device)

    def patch_masks(self, batch: list[DecodedImage], timer: StageTimer) -> list[list[PatchMask]]:
        """Patch masks for a batch of images that share one grid."""
        with timer.stage("backbone"):
            tokens, class_tokens = self.backbone.patch_and_class_tokens(
                stack_pixels(batch, self.device), self.choice.dtype
            )
        with small_kernel_threads(self.device):
            return segment_batch(self.segmenter, tokens, timer, class_tokens)

    def label(
        self, batch: list[DecodedImage], timer: StageTimer, save_scores: bool = False
    ) -> list[FinishedImage]:
        """Full-size masks as annotation records (and score maps) for a batch of one grid."""
        patch_masks = self.patch_masks(batch, timer)
        finished = []
        with small_kernel_threads(self.device), timer.stage("masks"):
            for item, masks in zip(batch, patch_masks, strict=True):
                kept, union = full_size_masks(
                    masks, item.width, item.height, self.refine, item.guide
                )
                finished.append(
                    FinishedImage(
                        file_name=item.file_name,
                        width=item.width,
                        height=item.height,
                        annotations=[
                            annotation_record(region.mask, region.score, region.extra)
                            for region in kept
                        ],
                        notes=dict(getattr(masks, "notes", None) or {}),
                        score_png=_score_png(union) if save_scores and union is not None else None,
                    )
                )
        return finished


class RunRecorder:
    """The driver's side of a run: journals finished images and skips as they come, writes
    score maps into the run folder, counts, and reports progress.

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


@dataclass
class LabelJob:
    """What an executor labels, and where its results go.

    Arguments:
      source: where the images are.
      todo: the images still to label, in order.
      config: the run's options.
      labeller: the engine (the local one; a distributed executor ships it to its workers).
      recorder: takes every finished image and skip, on the driver.
    """

    source: ImageSource
    todo: list[str]
    config: RunConfig
    labeller: Labeller
    recorder: RunRecorder


class Executor(Protocol):
    """Runs a ``LabelJob``: every image of ``todo`` ends in ``recorder.image`` or
    ``recorder.skip``. A bug (not a bad image) propagates."""

    def __call__(self, job: LabelJob) -> None:
        """Label the job's images."""
        ...

    def model_device(self, config: RunConfig) -> str:
        """Where the driver builds the model (``config.device`` when it runs it)."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Keys for run.json that say where the work ran (empty for a local run)."""
        ...


class LocalExecutor:
    """Labels in this process: decoding in background threads, batches of one patch grid."""

    def __call__(self, job: LabelJob) -> None:
        """Label the job's images in this process."""
        config, labeller, recorder = job.config, job.labeller, job.recorder
        timer = recorder.timer
        mean, std = labeller.backbone.mean_std
        patch = labeller.backbone.patch_size
        location = job.source.location

        def decode(name: str) -> DecodedImage:
            return prepare_image(
                location,
                name,
                config.resolution,
                patch,
                mean,
                std,
                config.max_pixels,
                guide_side(config.refine),
            )

        depth = max(4, 2 * config.batch_size)
        stream = prefetch(job.todo, decode, workers=config.workers, depth=depth)
        for batch, failures in batches_by_grid(stream, config.batch_size, window=depth):
            for name, error in failures:
                if not isinstance(error, ImageSkip):
                    raise error
                recorder.skip(name, str(error) or type(error).__name__)
            if not batch:
                continue
            for item in batch:
                timer.add("decode", item.decode_seconds)
            for finished in labeller.label(batch, timer, config.save_scores):
                recorder.image(finished)

    def model_device(self, config: RunConfig) -> str:
        """The run's device: the model runs here."""
        return config.device

    def provenance(self) -> dict[str, Any]:
        """Nothing more than run.json's ``device``."""
        return {}


def label_folder(
    input_dir: str | Path,
    out_dir: str | Path | None = None,
    config: RunConfig | None = None,
    *,
    overwrite: bool = False,
    backbone: Backbone | None = None,
    segmenter: Segmenter | None = None,
    progress: ProgressCallback | None = None,
    extra_provenance: dict[str, Any] | None = None,
    load_seconds: float = 0.0,
    executor: Executor | None = None,
) -> RunSummary:
    """Label every image under ``input_dir`` and write a run folder.

    Arguments:
      input_dir: the image folder (searched recursively), or an object storage prefix
        (``s3://bucket/prefix``; needs pyarrow, the ``ray`` extra).
      out_dir: the run folder; default ``./<folder name>-selfment``.
      config: run options (defaults when None).
      overwrite: replace a run folder made from another input or with other options.
      backbone: a ready backbone (built from ``config`` when None).
      segmenter: how tokens become masks (``make_segmenter(config.segment)`` when None).
      progress: called after every image with ``(done, total, file_name, skip_reason)``.
      extra_provenance: more keys for run.json (``apply`` records its head here).
      load_seconds: seconds the caller already spent loading the model it passes in
        (counted in the ``load model`` stage and the wall time).
      executor: where the labelling runs (``LocalExecutor()`` when None; a
        ``selfment_label.distributed.RayExecutor`` runs it on a Ray cluster).

    Returns:
      A ``RunSummary``.

    Raises:
      FileNotFoundError / NotADirectoryError: the input folder is missing.
      StorageError: the object storage prefix cannot be listed.
      NoImages: the folder has no images.
      OutputError: the run folder cannot be written (checked before the model loads).
      RunConflict: the output folder is busy or holds a run of another input or options.
      BackboneError: the weights cannot be found or loaded.
      RefineUnavailable: the refinement asked for needs a package that is not installed.
    """
    begin = time.perf_counter() - load_seconds
    config = config or RunConfig()
    check_available(config.refine)
    executor = executor or LocalExecutor()
    out_dir = Path(out_dir) if out_dir else default_out_dir(input_dir)
    check_run_target(out_dir, overwrite)
    source = input_source(input_dir, out_dir)
    keys = source.list_images()
    names = list(keys)
    if not names:
        raise NoImages(
            f"no images found under {input_dir} (looked for jpg, jpeg, png, bmp, webp, tif)"
        )
    if backbone is None:
        backbone = backbone_for(replace(config, device=executor.model_device(config)))
        load_seconds = time.perf_counter() - begin
    segmenter = segmenter or make_segmenter(config.segment)
    labeller = Labeller(backbone, segmenter, config.precision, config.refine)
    identity = backbone.identity()
    fingerprint = {
        "backbone": identity["backbone"],
        "timm_id": identity["timm_id"],
        "weights_sha256": identity["weights_sha256"],
        "resolution": config.resolution,
        "precision": labeller.choice.name,
        "save_scores": config.save_scores,
        "refine": config.refine,
        **segmenter.options(),
    }
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with RunLock(out_dir):
        _check_out_dir(out_dir, overwrite)
        journal = Journal(out_dir, fingerprint, source.uri)
        try:
            summary = _label(out_dir, source, keys, config, labeller, journal, progress, executor)
        finally:
            journal.close()
        records = journal.labelled(names)
        info = {
            "description": f"selfment-label pseudo-labels of {input_name(input_dir)}",
            "version": __version__,
            "date_created": started,
        }
        _, summary.annotations = write_coco_stream(out_dir / ANNOTATIONS_NAME, records, info)
        summary.skipped = {n: journal.skipped[n] for n in names if n in journal.skipped}
        summary.notes = {n: journal.notes[n] for n in names if n in journal.notes}
        if load_seconds:
            summary.stages = {"load model": load_seconds, **summary.stages}
        summary.wall_seconds = time.perf_counter() - begin
        provenance = {
            "tool": "selfment-label",
            "version": __version__,
            "started": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input_dir": source.uri,
            "backbone": identity,
            "options": {**config.shared_options(), **segmenter.options()},
            "device": str(backbone.device),
            "precision": labeller.choice.as_dict(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "images_found": summary.total,
            "images_labelled": len(records),
            "annotations": summary.annotations,
            "labelled_this_invocation": summary.labelled,
            "resumed_from_journal": summary.resumed,
            "images_skipped": summary.skipped,
            "image_notes": summary.notes,
            "stage_seconds": summary.stages,
            "seconds": round(summary.seconds, 3),
            "wall_seconds": round(summary.wall_seconds, 3),
            "images_per_second": round(summary.images_per_second, 3),
            **executor.provenance(),
            **(extra_provenance or {}),
        }
        atomic_write_json(out_dir / RUN_NAME, provenance)
    return summary


def _label(
    out_dir: Path,
    source: ImageSource,
    keys: dict[str, ContentKey],
    config: RunConfig,
    labeller: Labeller,
    journal: Journal,
    progress: ProgressCallback | None,
    executor: Executor,
) -> RunSummary:
    todo = [n for n in keys if not journal.done(n, keys[n])]
    resumed = len(keys) - len(todo)
    if resumed:
        logger.info("resuming: %d of %d images already done", resumed, len(keys))
    timer = StageTimer(labeller.device)
    recorder = RunRecorder(out_dir, journal, keys, len(keys), resumed, progress, timer)
    start = time.perf_counter()
    if todo:
        executor(LabelJob(source, todo, config, labeller, recorder))
    return RunSummary(
        out_dir=out_dir,
        total=len(keys),
        labelled=recorder.labelled,
        resumed=resumed,
        skipped={},
        annotations=0,
        seconds=time.perf_counter() - start,
        stages=timer.as_dict(),
        new_skips=recorder.new_skips,
    )
