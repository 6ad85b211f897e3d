"""Label a folder into a run folder: list the images, load the engine, label what is not
journalled yet, then write ``annotations.json`` and ``run.json`` from the journal.

Images are decoded in background threads while the model runs (``engine.LocalExecutor``), and
every finished image is journalled at once, so a killed run resumes where it stopped and
memory stays flat in the folder size. The final ``annotations.json`` and ``run.json`` are
written atomically from the journal.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_write_json
from ..config import RunConfig
from ..data.storage import ContentKey, ImageSource, is_uri, open_source
from ..engine import Executor, LabelJob, Labeller, LocalExecutor, backbone_for
from ..errors import SelfmentError
from ..features.backbone import Backbone
from ..outputs import check_output
from ..refine import check_available
from ..segment.base import Segmenter
from ..segment.registry import make_segmenter
from ..timing import StageTimer
from .coco import write_coco_stream
from .journal import Journal, RunConflict, RunLock
from .layout import (
    ANNOTATIONS_NAME,
    JOURNAL_NAME,
    LOCK_NAME,
    RUN_NAME,
    SCORES_DIR,
    is_run_folder,
)
from .record import ProgressCallback, RunRecorder, RunSummary, fingerprint, provenance, utc_now

logger = logging.getLogger(__name__)


class NoImages(SelfmentError, RuntimeError):
    """The input folder has no images."""


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
        raise RunConflict(f"the run folder {out_dir} is the input folder itself", remedy="out_dir")
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
            f"{out_dir} already holds an annotations.json that this tool did not journal",
            remedy="overwrite",
        )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    _refuse_foreign_annotations(out_dir, overwrite)
    if overwrite:
        clear_run(out_dir)


@dataclass
class _Inputs:
    """The images of a run: where they are and the content key of each."""

    source: ImageSource
    keys: dict[str, ContentKey]


def _list_images(input_dir: str | Path, out_dir: Path) -> _Inputs:
    source = input_source(input_dir, out_dir)
    keys = source.list_images()
    if not keys:
        raise NoImages(
            f"no images found under {input_dir} (looked for jpg, jpeg, png, bmp, webp, tif)"
        )
    return _Inputs(source, keys)


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
      load_seconds: seconds the caller already spent loading the ``backbone`` it passes in
        (reported as the ``load model`` stage and added to the wall time).
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
    clock, earlier = time.perf_counter(), load_seconds  # earlier: the caller's, before this call
    config = config or RunConfig()
    check_available(config.refine)
    executor = executor or LocalExecutor()
    out_dir = Path(out_dir) if out_dir else default_out_dir(input_dir)
    check_run_target(out_dir, overwrite)
    inputs = _list_images(input_dir, out_dir)
    if backbone is None:
        backbone, load_seconds = _load_backbone(config, executor)
    labeller = Labeller(
        backbone,
        segmenter or make_segmenter(config.segment),
        config.precision,
        config.refine,
        config.zoom,
    )
    started = utc_now()
    with RunLock(out_dir):
        _check_out_dir(out_dir, overwrite)
        journal = Journal(out_dir, fingerprint(config, labeller), inputs.source.uri)
        try:
            summary = _label(out_dir, inputs, config, labeller, journal, progress, executor)
        finally:
            journal.close()
        images_labelled = _write_annotations(out_dir, input_dir, inputs, journal, summary, started)
        if load_seconds:
            summary.stages = {"load model": load_seconds, **summary.stages}
        summary.wall_seconds = earlier + (time.perf_counter() - clock)
        record = provenance(summary, config, labeller, inputs.source.uri, started, images_labelled)
        record.update({**executor.provenance(), **(extra_provenance or {})})
        atomic_write_json(out_dir / RUN_NAME, record)
    return summary


def _load_backbone(config: RunConfig, executor: Executor) -> tuple[Backbone, float]:
    """The run's backbone, built where the executor wants the driver's copy, and the seconds
    it took."""
    clock = time.perf_counter()
    backbone = backbone_for(replace(config, device=executor.model_device(config)))
    return backbone, time.perf_counter() - clock


def _label(
    out_dir: Path,
    inputs: _Inputs,
    config: RunConfig,
    labeller: Labeller,
    journal: Journal,
    progress: ProgressCallback | None,
    executor: Executor,
) -> RunSummary:
    keys = inputs.keys
    todo = [n for n in keys if not journal.done(n, keys[n])]
    resumed = len(keys) - len(todo)
    if resumed:
        logger.info("resuming: %d of %d images already done", resumed, len(keys))
    timer = StageTimer(labeller.device)
    recorder = RunRecorder(out_dir, journal, keys, len(keys), resumed, progress, timer)
    start = time.perf_counter()
    if todo:
        executor(LabelJob(inputs.source, todo, config, labeller, recorder))
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


def _write_annotations(
    out_dir: Path,
    input_dir: str | Path,
    inputs: _Inputs,
    journal: Journal,
    summary: RunSummary,
    started: str,
) -> int:
    """Write annotations.json from the journal (every image of the run, this invocation's and
    earlier ones'), fill the summary's run-wide counts, and return the images labelled."""
    names = list(inputs.keys)
    records = journal.labelled(names)
    info = {
        "description": f"selfment-label pseudo-labels of {input_name(input_dir)}",
        "version": __version__,
        "date_created": started,
    }
    _, summary.annotations = write_coco_stream(out_dir / ANNOTATIONS_NAME, records, info)
    summary.skipped = {n: journal.skipped[n] for n in names if n in journal.skipped}
    summary.notes = {n: journal.notes[n] for n in names if n in journal.notes}
    return len(records)
