"""The labelling pipeline: stream images -> patch tokens -> segmenter -> masks -> journal -> COCO.

Images are decoded in background threads while the model runs, grouped into batches that
share a patch grid, and every finished image is journalled at once, so a killed run resumes
where it stopped and memory stays flat in the folder size. The final ``annotations.json``
and ``run.json`` are written atomically from the journal.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import __version__
from ..atomic import atomic_path, atomic_write_json
from ..config import RunConfig
from ..data.batching import batches_by_grid, prefetch, stack_pixels
from ..data.images import DecodedImage, ImageSkip, find_images, prepare_image
from ..device import PRECISIONS, resolve_device, small_kernel_threads
from ..features.backbone import Backbone, build_backbone
from ..masks import full_size_masks
from ..refine import check_available, guide_side
from ..segment.base import PatchMask, Segmenter
from ..segment.registry import make_segmenter
from ..timing import StageTimer
from .coco import annotation_record, write_coco_stream
from .journal import Journal, RunConflict, RunLock
from .layout import (
    ANNOTATIONS_NAME,
    JOURNAL_NAME,
    RUN_NAME,
    SCORES_DIR,
    is_run_folder,
    score_map_path,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str, "str | None"], None]


class NoImages(RuntimeError):
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


def default_out_dir(input_dir: Path) -> Path:
    """``./<folder name>-selfment`` in the current directory."""
    return Path.cwd() / f"{input_dir.resolve().name}-selfment"


def find_input_images(input_dir: Path, out_dir: Path) -> list[str]:
    """The images to label: every image under ``input_dir`` except those inside ``out_dir``
    or any other run folder (a run folder inside the input never labels its own outputs)."""
    if out_dir.resolve() == input_dir.resolve():
        raise RunConflict(
            f"--out {out_dir} is the input folder itself; choose a folder for the run's files"
        )
    out = out_dir.resolve()
    return find_images(
        input_dir,
        skip_folder=lambda folder: folder.resolve() == out or is_run_folder(folder),
        report=True,
    )


def clear_run(out_dir: Path) -> None:
    """Remove a previous run's outputs (journal, annotations, run.json, score maps)."""
    for name in (JOURNAL_NAME, ANNOTATIONS_NAME, RUN_NAME):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SCORES_DIR, ignore_errors=True)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if overwrite:
        clear_run(out_dir)
    elif (out_dir / ANNOTATIONS_NAME).exists() and not (out_dir / JOURNAL_NAME).exists():
        raise RunConflict(
            f"{out_dir} already holds an annotations.json that this tool did not journal; "
            "use --overwrite to replace it, or choose another --out"
        )


class Labeller:
    """Runs a backbone and a segmenter over decoded images and makes full-size masks.

    Arguments:
      backbone: the frozen feature extractor.
      segmenter: turns patch tokens into patch masks.
      precision: autocast precision of the backbone (``fp32``, ``fp16``, ``bf16``).
    """

    def __init__(self, backbone: Backbone, segmenter: Segmenter, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.backbone = backbone
        self.segmenter = segmenter
        self.autocast = PRECISIONS[precision]
        self.device = backbone.device

    def patch_masks(self, batch: list[DecodedImage], timer: StageTimer) -> list[list[PatchMask]]:
        """Patch masks for a batch of images that share one grid."""
        with timer.stage("backbone"):
            tokens = self.backbone.patch_tokens(stack_pixels(batch, self.device), self.autocast)
        with small_kernel_threads(self.device):
            return self.segmenter(tokens, timer)


def _write_score_map(out_dir: Path, file_name: str, soft: torch.Tensor) -> str:
    rel = score_map_path(file_name)
    target = out_dir / rel
    array = (soft.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    with atomic_path(target) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return rel


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
) -> RunSummary:
    """Label every image under ``input_dir`` and write a run folder.

    Arguments:
      input_dir: the image folder (searched recursively).
      out_dir: the run folder; default ``./<folder name>-selfment``.
      config: run options (defaults when None).
      overwrite: replace a run folder made with other options.
      backbone: a ready backbone (built from ``config`` when None).
      segmenter: how tokens become masks (``make_segmenter(config.segment)`` when None).
      progress: called after every image with ``(done, total, file_name, skip_reason)``.
      extra_provenance: more keys for run.json (``apply`` records its head here).
      load_seconds: seconds the caller already spent loading the model it passes in
        (counted in the ``load model`` stage and the wall time).

    Returns:
      A ``RunSummary``.

    Raises:
      FileNotFoundError / NotADirectoryError: the input folder is missing.
      NoImages: the folder has no images.
      RunConflict: the output folder is busy or holds a run with other options.
      BackboneError: the weights cannot be found or loaded.
      RefineUnavailable: the refinement asked for needs a package that is not installed.
    """
    begin = time.perf_counter() - load_seconds
    config = config or RunConfig()
    check_available(config.refine)
    input_dir = Path(input_dir)
    out_dir = Path(out_dir) if out_dir else default_out_dir(input_dir)
    names = find_input_images(input_dir, out_dir)
    if not names:
        raise NoImages(
            f"no images found under {input_dir} (looked for jpg, jpeg, png, bmp, webp, tif)"
        )
    if backbone is None:
        backbone = backbone_for(config)
        load_seconds = time.perf_counter() - begin
    segmenter = segmenter or make_segmenter(config.segment)
    labeller = Labeller(backbone, segmenter, config.precision)
    identity = backbone.identity()
    fingerprint = {
        "backbone": identity["backbone"],
        "timm_id": identity["timm_id"],
        "weights_sha256": identity["weights_sha256"],
        "resolution": config.resolution,
        "precision": config.precision,
        "save_scores": config.save_scores,
        "refine": config.refine,
        **segmenter.options(),
    }
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with RunLock(out_dir):
        _check_out_dir(out_dir, overwrite)
        journal = Journal(out_dir, fingerprint)
        try:
            summary = _label(input_dir, out_dir, names, config, labeller, journal, progress)
        finally:
            journal.close()
        records = journal.labelled(names)
        info = {
            "description": f"selfment-label pseudo-labels of {input_dir.resolve().name}",
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
            "input_dir": str(input_dir.resolve()),
            "backbone": identity,
            "options": {**config.shared_options(), **segmenter.options()},
            "device": str(backbone.device),
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
            **(extra_provenance or {}),
        }
        atomic_write_json(out_dir / RUN_NAME, provenance)
    return summary


def content_key(path: Path) -> list[int] | None:
    """What says an image file is unchanged: ``[size, mtime_ns]`` (None when it is gone)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _label(
    input_dir: Path,
    out_dir: Path,
    names: list[str],
    config: RunConfig,
    labeller: Labeller,
    journal: Journal,
    progress: ProgressCallback | None,
) -> RunSummary:
    keys = {n: content_key(input_dir / n) for n in names}
    todo = [n for n in names if not journal.done(n, keys[n])]
    resumed = len(names) - len(todo)
    if resumed:
        logger.info("resuming: %d of %d images already done", resumed, len(names))
    timer = StageTimer(labeller.device)
    mean, std = labeller.backbone.mean_std
    patch = labeller.backbone.patch_size

    def decode(name: str) -> DecodedImage:
        return prepare_image(
            input_dir,
            name,
            config.resolution,
            patch,
            mean,
            std,
            config.max_pixels,
            guide_side(config.refine),
        )

    done = resumed
    labelled = 0
    new_skips: dict[str, str] = {}
    start = time.perf_counter()
    depth = max(4, 2 * config.batch_size)
    stream = prefetch(todo, decode, workers=config.workers, depth=depth)
    for batch, failures in batches_by_grid(stream, config.batch_size, window=depth):
        for name, error in failures:
            if not isinstance(error, ImageSkip):
                raise error
            reason = str(error) or type(error).__name__
            journal.add({"kind": "skip", "file_name": name, "key": keys[name], "reason": reason})
            new_skips[name] = reason
            done += 1
            logger.warning("skipped %s: %s", name, reason)
            if progress:
                progress(done, len(names), name, reason)
        if not batch:
            continue
        for item in batch:
            timer.add("decode", item.decode_seconds)
        patch_masks = labeller.patch_masks(batch, timer)
        with small_kernel_threads(labeller.device):
            for item, masks in zip(batch, patch_masks, strict=True):
                item_key = keys[item.file_name]
                _record_image(out_dir, item, masks, config, journal, timer, item_key)
                labelled += 1
                done += 1
                if progress:
                    progress(done, len(names), item.file_name, None)
    seconds = time.perf_counter() - start
    return RunSummary(
        out_dir=out_dir,
        total=len(names),
        labelled=labelled,
        resumed=resumed,
        skipped={},
        annotations=0,
        seconds=seconds,
        stages=timer.as_dict(),
        new_skips=new_skips,
    )


def _record_image(
    out_dir: Path,
    item: DecodedImage,
    masks: list[PatchMask],
    config: RunConfig,
    journal: Journal,
    timer: StageTimer,
    key: list[int] | None,
) -> None:
    annotations = []
    entry: dict[str, Any] = {
        "kind": "image",
        "file_name": item.file_name,
        "key": key,
        "width": item.width,
        "height": item.height,
    }
    with timer.stage("masks"):
        kept, union = full_size_masks(masks, item.width, item.height, config.refine, item.guide)
        for region in kept:
            annotations.append(annotation_record(region.mask, region.score, region.extra))
        if config.save_scores and union is not None:
            entry["score_map"] = _write_score_map(out_dir, item.file_name, union)
    entry["annotations"] = annotations
    notes = getattr(masks, "notes", None)
    if notes:
        entry["notes"] = notes
    with timer.stage("write"):
        journal.add(entry)
